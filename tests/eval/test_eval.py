"""Evaluation harness: perplexity, zero-shot scoring, data loading, results, CLI command.

Fast tests use a character-level tokenizer, a tiny random Llama and a hand-set
bigram "model" whose log-probabilities are known exactly, so every expected
number is computed independently of the harness.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, processors

from actsparse.eval import TASKS, EvalResult, evaluate_task, load_task, load_wikitext2, perplexity, run_eval, wikitext2_articles
from actsparse.eval import command, data, tasks
from actsparse.eval.perplexity import window_starts

REPO = Path(__file__).resolve().parents[1]


# --- fixtures ---------------------------------------------------------------------


def _data_dir() -> Path | None:
    env = os.environ.get("ACTSPARSE_DATA")
    if env:
        return Path(env)
    local = REPO.parent / "shared" / "data"
    return local if local.is_dir() else None


@pytest.fixture
def real_data() -> Path:
    d = _data_dir()
    if d is None or not (d / "piqa.jsonl").is_file():
        pytest.skip("no evaluation data: set ACTSPARSE_DATA (or provide ../shared/data)")
    return d


def _char_tokenizer(add_bos: bool = False):
    """Character-level fast tokenizer (BPE without merges): token = one printable char."""
    from transformers import PreTrainedTokenizerFast

    chars = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + list(dict.fromkeys(string.printable))
    vocab = {c: i for i, c in enumerate(chars)}
    tk = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def tok():
    return _char_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than the default init, so contexts matter
        for p in model.parameters():
            p.mul_(8.0) if p.dim() == 2 else None
    return model


class Bigram(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: log-probabilities are known by hand; records inputs."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids, use_cache=None):
        self.calls.append(input_ids.clone())
        return types.SimpleNamespace(logits=self.table[input_ids])

    def set(self, tok, prev: str, nxt: str, value: float):
        with torch.no_grad():
            self.table[tok.convert_tokens_to_ids(prev), tok.convert_tokens_to_ids(nxt)] = value

    def logprob(self, tok, prev_id: int, next_id: int) -> float:
        return float(self.table.detach()[prev_id].double().log_softmax(-1)[next_id])


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


TEXT = (
    " = Alpha = \n The quick brown fox jumps over the lazy dog . It was not amused .\n"
    " = = Notes = = \n Foxes are small omnivorous mammals ; dogs are domesticated .\n"
    " = Beta = \n Bigram models only see the previous character , so context is short .\n"
    " = Gamma = \n A third article , with some more words to make the text longer than a window .\n"
) * 3


# --- perplexity -------------------------------------------------------------------


def test_perplexity_matches_model_loss(llama, tok):
    window, budget = 64, 200
    r = perplexity(llama, tok, TEXT, window=window, max_tokens=budget, batch_size=2, progress=False)
    assert (r.windows, r.tokens, r.stride) == (3, 192, window)  # whole windows within the budget
    ids = torch.tensor([_ids(tok, TEXT)])
    total = 0.0
    with torch.no_grad():
        for k in range(3):
            chunk = ids[:, k * window : k * window + window + 1]
            total += float(llama(chunk, labels=chunk).loss) * window
    expected = total / r.tokens
    assert r.nll == pytest.approx(expected, rel=1e-4)
    assert r.ppl == pytest.approx(math.exp(expected), rel=1e-4)


def test_perplexity_sliding_window_matches_masked_loss(llama, tok):
    window, stride = 48, 16
    r = perplexity(llama, tok, TEXT, window=window, stride=stride, max_tokens=48 + 5 * 16, batch_size=4, progress=False)
    assert (r.windows, r.tokens) == (6, 48 + 5 * 16)
    ids = torch.tensor([_ids(tok, TEXT)])
    total = 0.0
    with torch.no_grad():
        for k in range(6):
            chunk = ids[:, k * stride : k * stride + window + 1]
            labels = chunk.clone()
            if k:  # score only the last `stride` predictions
                labels[:, : 1 + window - stride] = -100
            total += float(llama(chunk, labels=labels).loss) * (window if k == 0 else stride)
    assert r.nll == pytest.approx(total / r.tokens, rel=1e-4)


@pytest.mark.parametrize("window,stride", [(20, 20), (20, 7), (33, 1)])
def test_perplexity_bigram_by_hand(tok, window, stride):
    """A bigram model ignores context, so any windowing scores ids[1..T] by the table."""
    torch.manual_seed(1)
    model = Bigram(len(tok))
    with torch.no_grad():
        model.table.normal_(0, 2)
    text = TEXT[:300]
    ids = _ids(tok, text)
    r = perplexity(model, tok, text, window=window, stride=stride, batch_size=3, progress=False)
    assert r.windows == 1 + (len(ids) - window - 1) // stride
    last = window + (r.windows - 1) * stride
    assert r.tokens == last
    nll = -sum(model.logprob(tok, ids[j - 1], ids[j]) for j in range(1, last + 1)) / last
    assert r.nll == pytest.approx(nll, rel=1e-6)


def test_window_starts_cover_each_token_once():
    for n, w, s in [(100, 10, 10), (100, 10, 3), (11, 10, 1), (57, 8, 5)]:
        starts = window_starts(n, w, s)
        scored = list(range(1, w + 1)) + [j for b in starts[1:] for j in range(b + w - s + 1, b + w + 1)]
        assert scored == list(range(1, len(scored) + 1)) and scored[-1] <= n - 1


def test_perplexity_prepends_bos_when_tokenizer_does(llama):
    tok_bos = _char_tokenizer(add_bos=True)
    model = Bigram(len(tok_bos))
    r = perplexity(model, tok_bos, TEXT, window=16, max_tokens=32, progress=False)
    (x,) = model.calls
    assert x.shape == (2, 17) and (x[:, 0] == tok_bos.bos_token_id).all()
    ids = _ids(tok_bos, TEXT)
    assert x[1, 1:].tolist() == ids[16:32] and r.tokens == 32
    model.calls.clear()
    perplexity(model, tok_bos, TEXT, window=16, max_tokens=32, add_bos=False, progress=False)
    assert model.calls[0].shape == (2, 16)


def test_perplexity_bad_inputs(llama, tok):
    with pytest.raises(ValueError, match="empty"):
        perplexity(llama, tok, "", progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity(llama, tok, "  \n ", progress=False)
    short = "x" * 64  # 64 tokens: one window of 64 needs 65
    with pytest.raises(ValueError, match=r"has 64 tokens .* needs 65"):
        perplexity(llama, tok, short, window=64, progress=False)
    assert perplexity(llama, tok, short + "y", window=64, progress=False).tokens == 64
    with pytest.raises(ValueError, match="max_tokens=10 .* 64"):
        perplexity(llama, tok, TEXT, window=64, max_tokens=10, progress=False)
    with pytest.raises(ValueError, match="stride"):
        perplexity(llama, tok, TEXT, window=64, stride=65, progress=False)


# --- zero-shot scoring ---------------------------------------------------------------


def test_loglikelihood_batched_equals_single(llama, tok):
    pairs = [("Question: a?\nAnswer:", " yes"), ("Hi", " there friend"), ("A longer context here", " x"), ("Q", " ab")]
    reqs = [tasks.make_request(tok, c, x) for c, x in pairs]
    batched = tasks.loglikelihood(llama, tok, reqs, batch_size=3)
    single = [tasks.loglikelihood(llama, tok, [r], batch_size=1)[0] for r in reqs]
    for (a, ga, na), (b, gb, nb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb and na == nb
    # and equal to a direct computation from the model on the concatenation
    c, x = pairs[1]
    full = torch.tensor([_ids(tok, c + x)])
    with torch.no_grad():
        lp = llama(full).logits[0, :-1].float().log_softmax(-1)
    n = len(_ids(tok, x))
    direct = sum(float(lp[i, full[0, i + 1]]) for i in range(full.shape[1] - 1 - n, full.shape[1] - 1))
    assert batched[1][0] == pytest.approx(direct, abs=1e-4) and batched[1][2] == n


def test_make_request_moves_space_and_handles_bos(tok):
    r = tasks.make_request(tok, "ab ", "cd")
    assert r.context_ids == _ids(tok, "ab") and r.continuation_ids == _ids(tok, " cd")
    tok_bos = _char_tokenizer(add_bos=True)
    r = tasks.make_request(tok_bos, "ab", " cd")
    assert r.context_ids == [tok_bos.bos_token_id] + _ids(tok, "ab") and r.continuation_ids == _ids(tok, " cd")
    r = tasks.make_request(tok, "", "cd")  # empty context: condition on BOS
    assert r.context_ids == [tok.bos_token_id]


def test_multiple_choice_known_answer(tok):
    model = Bigram(len(tok))
    model.set(tok, " ", "c", 8.0)  # after a space, "c" is very likely: " cat" wins
    docs = [
        {"query": "Question: Which pet purrs?\n", "choices": ["dog", "cat"], "gold": 1, "idx": 0},
        {"query": "Question: Which pet purrs?", "choices": ["cat", "dog", "eel"], "gold": 0, "idx": 1},
    ]
    metrics, details = tasks.score_multiple_choice(model, tok, docs, batch_size=2)
    assert [d["pred"] for d in details] == [1, 0]
    assert metrics["acc"] == 1.0 and metrics["acc_norm"] == 1.0
    # lm-eval's prompt: "Question: ...\nAnswer:" then " choice"
    rows = [r.tolist() for call in model.calls for r in call]
    assert any(row[: len(_ids(tok, "Question: Which pet purrs?\nAnswer: c"))] == _ids(tok, "Question: Which pet purrs?\nAnswer: c") for row in rows)


def test_acc_norm_differs_from_acc(tok):
    """Uniform model: every char costs log V, so raw sums favour the short choice but
    per-character averages favour the long one (the leading space is scored, not counted)."""
    model = Bigram(len(tok))
    doc = {"query": "Question: q", "choices": ["xx", "yyyyyyyy"], "gold": 1, "idx": 0}
    metrics, (d,) = tasks.score_multiple_choice(model, tok, [doc])
    log_v = math.log(len(tok))
    assert d["lls"] == pytest.approx([-3 * log_v, -9 * log_v], rel=1e-6)
    assert (d["pred"], d["pred_norm"]) == (0, 1)
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0


def test_winogrande_partial_scoring(tok, monkeypatch):
    model = Bigram(len(tok))
    model.set(tok, "B", " ", 6.0)  # " ran" is likelier after "...B" than after "...A"
    docs = [
        {"context_options": ["Then A", "Then B"], "continuation": "ran off.", "gold": 1, "idx": 0},
        {"context_options": ["Then B", "Then A"], "continuation": "ran off.", "gold": 1, "idx": 1},
    ]
    seen = []
    real = tasks.loglikelihood

    def spy(model, tokenizer, requests, **kw):
        seen.extend(requests)
        return real(model, tokenizer, requests, **kw)

    monkeypatch.setattr(tasks, "loglikelihood", spy)
    metrics, details = tasks.score_partial(model, tok, docs)
    assert [d["pred"] for d in details] == [1, 0]
    assert metrics["acc"] == 0.5
    # the same continuation tokens are scored after each context
    assert seen[0].continuation_ids == seen[1].continuation_ids == _ids(tok, " ran off.")
    assert seen[0].context_ids == _ids(tok, "Then A") and seen[1].context_ids == _ids(tok, "Then B")
    d = details[0]
    assert d["lls"][1] - d["lls"][0] == pytest.approx(
        model.logprob(tok, tok.convert_tokens_to_ids("B"), tok.convert_tokens_to_ids(" "))
        - model.logprob(tok, tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids(" ")),
        abs=1e-5,
    )


def test_lambada_greedy_accuracy_and_perplexity(tok):
    model = Bigram(len(tok))
    for a, b in [("e", " "), (" ", "c"), ("c", "a"), ("a", "t")]:
        model.set(tok, a, b, 5.0)  # greedy continuation of "the" is " cat"
    docs = [
        {"context": "I saw the", "continuation": "cat", "idx": 0},
        {"context": "I saw the", "continuation": "cot", "idx": 1},
        {"context": "I saw the", "continuation": "ca", "idx": 2},
    ]
    metrics, details = tasks.score_last_word(model, tok, docs)
    assert [d["greedy"] for d in details] == [True, False, True]
    assert metrics["acc"] == pytest.approx(2 / 3)
    lls = []
    for d in docs:
        ids = _ids(tok, "e " + d["continuation"])
        lls.append(sum(model.logprob(tok, ids[i - 1], ids[i]) for i in range(1, len(ids))))
    assert [d["ll"] for d in details] == pytest.approx(lls, abs=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(-sum(lls) / 3), rel=1e-5)


# --- data ---------------------------------------------------------------------------


def _write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A complete, small data directory in the real formats."""
    (tmp_path / "wikitext2_test.raw").write_bytes(TEXT.replace("\n", "\r\n").encode())
    _write_jsonl(tmp_path / "piqa.jsonl", [
        {"query": f"Question: How to {i}?\n", "choices": ["use a cup", "use a fork"], "gold": i % 2} for i in range(30)
    ])
    _write_jsonl(tmp_path / "arc_easy.jsonl", [
        {"query": f"Question: What is {i}?", "choices": ["a", "b c", "d", "efg"], "gold": i % 4} for i in range(30)
    ])
    _write_jsonl(tmp_path / "winogrande.jsonl", [
        {"context_options": ["Ann met Bo so Ann", "Ann met Bo so Bo"], "continuation": f"was glad {i}.", "gold": i % 2}
        for i in range(30)
    ])
    _write_jsonl(tmp_path / "lambada_openai.jsonl", [
        {"context": f"Story {i} ends with the word", "continuation": "end"} for i in range(30)
    ])
    return tmp_path


def test_subsampling_is_seeded_random_and_nested(tiny_data):
    a = load_task("piqa", tiny_data, limit=10, seed=0)
    assert [r["idx"] for r in a] == [r["idx"] for r in load_task("piqa", tiny_data, limit=10, seed=0)]
    b = load_task("piqa", tiny_data, limit=10, seed=1)
    assert {r["idx"] for r in a} != {r["idx"] for r in b}
    assert [r["idx"] for r in a] != list(range(10))  # a random sample, not the first N
    assert [r["idx"] for r in a] == sorted(r["idx"] for r in a)
    bigger = {r["idx"] for r in load_task("piqa", tiny_data, limit=20, seed=0)}
    assert {r["idx"] for r in a} <= bigger
    assert len(load_task("piqa", tiny_data, limit=1000)) == 30 == len(load_task("piqa", tiny_data))
    with pytest.raises(ValueError, match="limit"):
        load_task("piqa", tiny_data, limit=0)


def test_missing_file_names_path_and_env(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_task("lambada", tmp_path)
    msg = str(e.value)
    assert str((tmp_path / "lambada_openai.jsonl").resolve()) in msg and "ACTSPARSE_DATA" in msg and "--data" in msg
    with pytest.raises(FileNotFoundError, match="wikitext2_test.raw"):
        load_wikitext2(tmp_path)


def test_env_var_and_no_data_at_all(tiny_data, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_DATA", str(tiny_data))
    assert len(load_task("arc_easy")) == 30
    monkeypatch.delenv("ACTSPARSE_DATA")
    monkeypatch.setattr(data, "_have_datasets", lambda: False)
    with pytest.raises(FileNotFoundError, match="ACTSPARSE_DATA.*data_dir"):
        load_task("piqa")


def test_unknown_task_lists_allowed(tiny_data, llama, tok):
    for call in (lambda: load_task("hellaswag", tiny_data), lambda: evaluate_task(llama, tok, "hellaswag", data_dir=tiny_data)):
        with pytest.raises(ValueError) as e:
            call()
        assert all(t in str(e.value) for t in TASKS)
    with pytest.raises(ValueError, match="load_wikitext2"):
        load_task("wikitext2", tiny_data)


def test_malformed_record(tmp_path):
    _write_jsonl(tmp_path / "piqa.jsonl", [{"query": "q", "choices": ["a"]}])
    with pytest.raises(ValueError, match=r"piqa.jsonl:1: .* lacks gold"):
        load_task("piqa", tmp_path)


def test_wikitext_text_and_articles(tiny_data):
    text = load_wikitext2(tiny_data)
    assert "\r" not in text and text.endswith(".\n") and "\n\n" not in text
    arts = wikitext2_articles(text)
    assert len(arts) == 9 and arts[0].startswith(" = Alpha = \n") and " = = Notes = = " in arts[0]
    assert "".join(arts) == text


def test_real_data_formats(real_data):
    text = load_wikitext2(real_data)
    arts = wikitext2_articles(text)
    assert len(arts) == 62 and arts[0].startswith(" = Robert Boulter = \n")
    assert len(text.splitlines()) == 2891
    sizes = {"piqa": 1838, "arc_easy": 2376, "winogrande": 1267, "lambada": 5153}
    for task, n in sizes.items():
        assert len(load_task(task, real_data)) == n


# --- results and run_eval -----------------------------------------------------------------


def test_run_eval_end_to_end_and_json_round_trip(llama, tok, tiny_data, tmp_path):
    res = run_eval(llama, tok, list(TASKS), limit=6, seed=3, ppl_window=32, ppl_tokens=64, batch_size=4,
                   data_dir=tiny_data, model_name="tiny-llama", plan_info={"path": "p.json"}, progress=False)
    assert list(res.metrics) == list(TASKS)
    assert res.n == {"wikitext2": 64, "piqa": 6, "arc_easy": 6, "winogrande": 6, "lambada": 6}
    assert set(res.metrics["piqa"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(res.metrics["lambada"]) == {"acc", "acc_stderr", "ppl"}
    assert res.settings["ppl_window"] == 32 and res.settings["limit"] == 6 and res.settings["seed"] == 3
    assert {"torch", "transformers"} <= set(res.versions) and res.started and res.finished
    path = res.to_json(tmp_path / "out" / "r.json")
    back = EvalResult.from_json(path)
    assert back == res
    table = res.table()
    assert "tiny-llama" in table and "p.json" in table
    lines = table.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("task"))
    body = lines[header + 2 :]
    assert len(body) == 2 + 2 + 2 + 1 + 2  # ppl, nll; acc/acc_norm x2; acc; acc/ppl
    assert len({ln.index(ln.split()[2]) + len(ln.split()[2]) for ln in body}) == 1  # values right-aligned
    # the same seed gives the same numbers
    again = run_eval(llama, tok, ["piqa"], limit=6, seed=3, data_dir=tiny_data, progress=False)
    assert again.metrics["piqa"] == res.metrics["piqa"]


def test_table_handles_inf_and_nan():
    r = EvalResult(model=None, metrics={"lambada": {"acc": 0.0, "acc_stderr": float("nan"), "ppl": float("inf")}}, n={"lambada": 1})
    t = r.table()
    assert "inf" in t and "model: -" in t


# --- command ------------------------------------------------------------------------------


def _args(*argv):
    return command.add_eval_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--tasks", "piqa,hellaswag"], "allowed tasks: wikitext2, piqa, arc_easy, winogrande, lambada"),
        (["--dtype", "float64"], "unknown dtype"),
        (["--tasks", "piqa", "--limit", "0"], "--limit"),
        (["--ppl-tokens", "100", "--window", "512"], "less than one window"),
        (["--plan", "no/such/plan.json"], "plan file not found"),
    ],
)
def test_command_validation_errors(argv, needle, tiny_data, capsys):
    assert command.run_eval_command(_args("--data", str(tiny_data), *argv)) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_command_missing_data(tmp_path, capsys):
    assert command.run_eval_command(_args("--data", str(tmp_path / "nowhere"), "--tasks", "winogrande")) == 2
    err = capsys.readouterr().err
    assert "winogrande.jsonl" in err and "ACTSPARSE_DATA" in err and len(err.strip().splitlines()) == 1


def test_command_runs_with_fake_models_module(llama, tok, tiny_data, tmp_path, monkeypatch, capsys):
    import actsparse

    loaded = {}

    def load(name, dtype=None, device=None):
        loaded.update(name=name, dtype=dtype, device=device)
        return llama, tok

    fake = types.SimpleNamespace(load=load)
    monkeypatch.setitem(sys.modules, "actsparse.models", fake)
    monkeypatch.setattr(actsparse, "models", fake, raising=False)
    out = tmp_path / "res.json"
    argv = ["--data", str(tiny_data), "--tasks", "wikitext2,lambada", "--limit", "4", "--window", "32",
            "--ppl-tokens", "64", "--out", str(out), "--no-progress", "--model", "tiny", "--dtype", "fp32"]
    assert command.run_eval_command(_args(*argv)) == 0
    assert loaded == {"name": "tiny", "dtype": torch.float32, "device": "cpu"}
    printed = capsys.readouterr().out
    assert "wikitext2" in printed and "lambada" in printed
    res = EvalResult.from_json(out)
    assert res.model == "tiny" and res.n == {"wikitext2": 64, "lambada": 4}


def test_command_unknown_model(tiny_data, monkeypatch, capsys):
    import actsparse

    def load(name, dtype=None, device=None):
        raise ValueError(f"unknown model {name!r}; available: smollm2-135m, gemma3-270m")

    fake = types.SimpleNamespace(load=load)
    monkeypatch.setitem(sys.modules, "actsparse.models", fake)
    monkeypatch.setattr(actsparse, "models", fake, raising=False)
    assert command.run_eval_command(_args("--data", str(tiny_data), "--model", "nope", "--tasks", "piqa")) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and len(err.strip().splitlines()) == 1


# --- real model (slow) ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_dense_perplexity_and_piqa(real_data):
    try:
        from actsparse import models
    except ModuleNotFoundError as e:
        if e.name != "actsparse.models":
            raise
        pytest.skip("actsparse.models is not available")
    model, tokenizer = models.load("smollm2-135m")
    r = perplexity(model, tokenizer, data_dir=real_data, window=512, max_tokens=1024, progress=False)
    assert r.tokens == 1024 and math.isfinite(r.ppl) and 20 < r.ppl < 60, r
    res = evaluate_task(model, tokenizer, "piqa", limit=20, data_dir=real_data, progress=False)
    assert res.n == 20 and 0.0 <= res.metrics["acc"] <= 1.0
