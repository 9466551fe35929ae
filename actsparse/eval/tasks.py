"""Zero-shot tasks scored by log-likelihood, the way lm-evaluation-harness does.

Prompts. piqa and arc_easy use lm-eval's prompt: ``query.rstrip() + "\\nAnswer:"``
as context and ``" " + choice`` as continuation. The local files hold
llm-foundry's ``"Question: ...\\n"`` queries, so this rebuilds lm-eval's
``"Question: {q}\\nAnswer: {choice}"`` exactly (llm-foundry itself joins with
``"\\nAnswer: "``, which doubles piqa's newline). winogrande uses partial
scoring: the same continuation ``" " + continuation`` is scored after each
of the two contexts. lambada scores ``" " + continuation`` after the context
(no space is added when either side already has whitespace there).

Tokenisation follows lm-eval: trailing whitespace of the context moves to the
continuation, ``context + continuation`` is encoded whole and the continuation
tokens are the tail past the encoded context (so merges across the boundary
are the ones the model would see). If the tokenizer adds a BOS by default it
is put in front; an empty context gets BOS (or EOS) so there is something to
condition on.

Metrics.
* ``acc``: the choice with the highest summed log-likelihood is the gold one.
* ``acc_norm``: the same with each log-likelihood divided by the length of the
  choice text in characters (``len(choice)``, no leading space), which is what
  lm-eval's code computes (its docs call it byte length; they agree on ASCII).
* lambada ``acc``: every continuation token is the greedy (argmax) token.
* lambada ``ppl``: lm-eval's definition ``exp(-mean_docs(sum of the
  continuation's token log-likelihoods))``, a per-word (not per-token) perplexity.
* ``*_stderr``: the standard error of the mean, ``sqrt(p(1-p)/(n-1))``, to judge
  whether a dense/sparse gap on a subsample is noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .data import TASKS, check_task, load_task
from .perplexity import adds_bos, encode, forward_logits, model_device, perplexity, token_logprobs, progress_bar


@dataclass
class TaskResult:
    """Metrics of one task on ``n`` examples (tokens scored, for wikitext2)."""

    task: str
    metrics: dict[str, float]
    n: int
    seconds: float = 0.0
    details: list[dict] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class _Request:
    context_ids: list[int]
    continuation_ids: list[int]


# --- loglikelihood requests -----------------------------------------------------------


def _join_delimiter(context: str, continuation: str) -> str:
    if not context or context[-1:].isspace() or continuation[:1].isspace():
        return ""
    return " "


def make_request(tokenizer, context: str, continuation: str, *, bos: bool | None = None) -> _Request:
    """Token ids of a (context, continuation) pair; see the module docstring."""
    if not continuation:
        raise ValueError("empty continuation: nothing to score")
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if bos is None:
        bos = adds_bos(tokenizer)
    prefix: list[int] = [tokenizer.bos_token_id] if bos else []
    if not context and not prefix:
        tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if tok is None:
            raise ValueError("empty context and the tokenizer has neither BOS nor EOS to condition on")
        prefix = [tok]
    context_ids = prefix + (encode(tokenizer, context) if context else [])
    whole = prefix + encode(tokenizer, context + continuation)
    cont_ids = whole[len(context_ids) :]
    if not cont_ids:  # the whole encoding merged into the context; score the continuation alone
        cont_ids = encode(tokenizer, continuation)
    return _Request(context_ids, cont_ids)


def _max_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def loglikelihood(
    model,
    tokenizer,
    requests: list[_Request],
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool, int]]:
    """For each request: (summed log-likelihood of the continuation, all tokens greedy, token count).

    Requests are sorted by length (longest first) and padded on the right, so
    every real token sees only real tokens before it and no attention mask is
    needed; the order, hence the batches, are deterministic.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    max_len = _max_length(model)
    rows = []
    for req in requests:
        tokens = req.context_ids + req.continuation_ids
        inp = tokens[:-1]
        if max_len and len(inp) > max_len:
            if len(req.continuation_ids) > max_len:
                raise ValueError(
                    f"continuation of {len(req.continuation_ids)} tokens exceeds the model's {max_len} positions"
                )
            inp = inp[-max_len:]
        rows.append(inp)
    order = sorted(range(len(requests)), key=lambda i: (-len(rows[i]), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    device = model_device(model)
    out: list[tuple[float, bool, int] | None] = [None] * len(requests)
    with torch.inference_mode():
        for batch in progress_bar(batches, total=len(batches), desc=desc, enabled=progress):
            width = len(rows[batch[0]])
            x = torch.full((len(batch), width), pad, dtype=torch.long)
            for r, i in enumerate(batch):
                x[r, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            logits = forward_logits(model, x.to(device))
            for r, i in enumerate(batch):
                cont = requests[i].continuation_ids
                end = len(rows[i])
                lp, greedy = token_logprobs(logits[r, end - len(cont) : end], torch.tensor(cont, dtype=torch.long))
                out[i] = (float(lp.double().sum()), bool(greedy.all()), len(cont))
    return out  # type: ignore[return-value]


# --- metrics ---------------------------------------------------------------------


def _argmax(values) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean_stderr(hits: list[float]) -> tuple[float, float]:
    n = len(hits)
    p = sum(hits) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    return p, stderr


def _check_gold(doc: dict, n_choices: int) -> int:
    gold = int(doc["gold"])
    if not 0 <= gold < n_choices:
        raise ValueError(f"gold index {gold} out of range for {n_choices} choices (record {doc.get('idx')})")
    return gold


def score_multiple_choice(model, tokenizer, docs: list[dict], *, batch_size=8, progress=False, desc="mc"):
    """piqa / arc_easy records -> (metrics with acc, acc_norm, per-doc details)."""
    bos = adds_bos(tokenizer)
    reqs = []
    for doc in docs:
        context = doc["query"].rstrip() + "\nAnswer:"
        for choice in doc["choices"]:
            reqs.append(make_request(tokenizer, context, " " + choice, bos=bos))
    results = loglikelihood(model, tokenizer, reqs, batch_size=batch_size, progress=progress, desc=desc)
    details, k = [], 0
    for doc in docs:
        lls = [results[k + j][0] for j in range(len(doc["choices"]))]
        k += len(doc["choices"])
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, doc["choices"])]
        gold = _check_gold(doc, len(lls))
        details.append({"idx": doc.get("idx"), "gold": gold, "pred": _argmax(lls), "pred_norm": _argmax(norm), "lls": lls})
    acc, acc_se = _mean_stderr([float(x["pred"] == x["gold"]) for x in details])
    accn, accn_se = _mean_stderr([float(x["pred_norm"] == x["gold"]) for x in details])
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": accn, "acc_norm_stderr": accn_se}, details


def score_partial(model, tokenizer, docs: list[dict], *, batch_size=8, progress=False, desc="winogrande"):
    """winogrande records: the one continuation scored after each context -> (metrics, details)."""
    bos = adds_bos(tokenizer)
    reqs = []
    for doc in docs:
        cont = doc["continuation"]
        for ctx in doc["context_options"]:
            reqs.append(make_request(tokenizer, ctx, _join_delimiter(ctx, cont) + cont, bos=bos))
    results = loglikelihood(model, tokenizer, reqs, batch_size=batch_size, progress=progress, desc=desc)
    details, k = [], 0
    for doc in docs:
        lls = [results[k + j][0] for j in range(len(doc["context_options"]))]
        k += len(doc["context_options"])
        details.append({"idx": doc.get("idx"), "gold": _check_gold(doc, len(lls)), "pred": _argmax(lls), "lls": lls})
    acc, acc_se = _mean_stderr([float(x["pred"] == x["gold"]) for x in details])
    return {"acc": acc, "acc_stderr": acc_se}, details


def score_last_word(model, tokenizer, docs: list[dict], *, batch_size=8, progress=False, desc="lambada"):
    """lambada records -> (metrics with greedy acc and lm-eval's ppl, details)."""
    bos = adds_bos(tokenizer)
    reqs = []
    for d in docs:
        cont = _join_delimiter(d["context"], d["continuation"]) + d["continuation"]
        reqs.append(make_request(tokenizer, d["context"], cont, bos=bos))
    results = loglikelihood(model, tokenizer, reqs, batch_size=batch_size, progress=progress, desc=desc)
    details = [{"idx": d.get("idx"), "ll": ll, "greedy": g, "tokens": n} for d, (ll, g, n) in zip(docs, results)]
    acc, acc_se = _mean_stderr([float(x["greedy"]) for x in details])
    mean_nll = -sum(x["ll"] for x in details) / len(details)
    ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf
    return {"acc": acc, "acc_stderr": acc_se, "ppl": ppl}, details


_SCORERS = {
    "piqa": score_multiple_choice,
    "arc_easy": score_multiple_choice,
    "winogrande": score_partial,
    "lambada": score_last_word,
}


def evaluate_task(
    model,
    tokenizer,
    task: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    data_dir=None,
    progress: bool = True,
    ppl_window: int = 512,
    ppl_stride: int | None = None,
    ppl_tokens: int | None = None,
) -> TaskResult:
    """Evaluate one of ``TASKS``. ``limit``/``seed`` subsample the zero-shot sets;
    the ``ppl_*`` settings apply to wikitext2 only (``n`` is then the tokens scored)."""
    check_task(task)
    t0 = time.perf_counter()
    if task == "wikitext2":
        r = perplexity(
            model, tokenizer, data_dir=data_dir, window=ppl_window, stride=ppl_stride,
            max_tokens=ppl_tokens, batch_size=batch_size, progress=progress,
        )
        return TaskResult(task, {"ppl": r.ppl, "nll": r.nll}, r.tokens, time.perf_counter() - t0)
    docs = load_task(task, data_dir, limit=limit, seed=seed)
    metrics, details = _SCORERS[task](model, tokenizer, docs, batch_size=batch_size, progress=progress, desc=task)
    return TaskResult(task, metrics, len(docs), time.perf_counter() - t0, details)


__all__ = ["TASKS", "TaskResult", "evaluate_task", "loglikelihood", "make_request",
           "score_multiple_choice", "score_partial", "score_last_word"]
