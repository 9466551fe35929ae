"""`actsparse train --recipe moe` on a tiny random model: converted here or from a saved plan,
the files read back by ``load_finetuned`` compile to the same logits, errors are clear."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import actsparse
from actsparse.cli import main
from actsparse.models import tiny
from actsparse.plan import SparsityPlan
from actsparse.plan.rules.experts import Experts
from actsparse.train.moe_finetune import adapters_path, load_finetuned
from actsparse.train.moefy import routed
from tests.masking import assert_close_outputs, compiled_prefill_decode, prefill_decode, token_inputs

SMALL = ["--model", "tiny:llama", "--steps", "4", "--batch-size", "2", "--seq-len", "12", "--samples", "6",
         "--held-out", "2", "--rank", "2", "--no-progress"]


def train(tmp_path, *argv):
    return main(["train", "--recipe", "moe", *SMALL, "--out", str(tmp_path / "moe.plan.json"),
                 "--json", str(tmp_path / "s.json"), *argv])


def saved_plan(tmp_path, layers=2):
    """A conversion of the tiny Llama saved as ``actsparse.moefy`` makes it (8 experts, density 0.5)."""
    dense = tiny("llama", num_hidden_layers=layers)
    ids = torch.randint(3, dense.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    _, plan = actsparse.moefy(dense, experts=8, density=0.5, calibration=ids)
    return plan.save(tmp_path / f"conv{layers}.plan.json")


@pytest.mark.parametrize("recipe", ["router", "both"])
def test_convert_finetune_save_load_compile(tmp_path, capsys, recipe):
    conv = tmp_path / "conv.plan.json"
    assert train(tmp_path, "--experts", "8", "--density", "0.5", "--finetune", recipe, "--save-plan", str(conv)) == 0
    assert "held-out KL" in capsys.readouterr().out
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["recipe"] == "moe" and s["finetune"] == recipe and s["experts"] == 8 and s["converted_from"] == "here"
    assert s["tokens"] == 4 * 2 * 12 and len(s["kl_per_step"]) == 4 and s["steps"] == 4
    assert s["before"]["kl"] > 0 and s["after"]["kl"] > 0 and len(s["after"]["density_per_mlp"]) == 2
    assert abs(s["after"]["density"] - 0.5) < 0.1 and abs(s["before"]["density"] - 0.5) < 0.1
    assert "finetune" not in SparsityPlan.load(conv, tiny("llama")).info  # the conversion, before training
    assert (s["adapters"] is not None) == (recipe == "both") == adapters_path(s["plan"]).is_file()
    model, plan = load_finetuned(tiny("llama"), s["plan"])
    assert plan.info["finetune"]["train"] == recipe and plan.rule(Experts).specs
    ids, dec = token_inputs(1, 5, 3, seed=2, low=3)
    with routed(model, plan):
        want = prefill_decode(model.forward, model, ids, dec)
    assert_close_outputs(compiled_prefill_decode(model, plan, ids, dec), want, tol=1e-4)


def test_saved_plan_at_another_density_reuses_cached_samples(tmp_path):
    plan, seqs = saved_plan(tmp_path), tmp_path / "seqs.safetensors"
    stale = adapters_path(tmp_path / "moe.plan.json")
    stale.write_bytes(b"an earlier run's adapters")
    for _ in range(2):
        assert train(tmp_path, "--plan", str(plan), "--density", "0.375", "--sequences", str(seqs)) == 0
        s = json.loads((tmp_path / "s.json").read_text())
        assert s["converted_from"] == str(plan) and s["target_density"] == 0.375 and s["adapters"] is None
        assert abs(s["after"]["density"] - 0.375) < 0.1
    assert s["sample_seconds"] == 0.0 and seqs.is_file() and not stale.exists()
    model, got = load_finetuned(tiny("llama"), s["plan"])
    assert all(sp["density"] == 0.375 for sp in got.rule(Experts).specs.values())


@pytest.mark.parametrize("argv, msg", [
    (["--recipe", "bogus"], "unknown --recipe 'bogus'"),
    (["--experts", "8"], "--experts belongs to --recipe moe, not --recipe relufy"),
    (["--sequences", "s.safetensors"], "--sequences belongs to --recipe moe"),
    (["--recipe", "moe", "--variant", "relu"], "--variant belongs to --recipe relufy, not --recipe moe"),
    (["--recipe", "moe", "--l1", "0.1"], "--l1 belongs to --recipe relufy"),
    (["--recipe", "moe"], "--recipe moe needs --plan PATH"),
    (["--recipe", "moe", "--plan", "p.json", "--experts", "8"], "give --plan or --experts, not both"),
    (["--recipe", "moe", "--plan", "missing.json"], "--plan missing.json: no such file"),
    (["--recipe", "moe", "--experts", "8"], "--experts needs --density"),
    (["--recipe", "moe", "--experts", "0", "--density", "0.5"], "--experts must be >= 1"),
    (["--recipe", "moe", "--experts", "8", "--density", "1.5"], "density must be a number in (0, 1]"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--finetune", "experts"],
     "unknown --finetune 'experts'; choose one of router, lora, both"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--router", "tree"], "unknown --router 'tree'"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--targets", "q_proj"],
     "targets must be a non-empty subset of gate_proj, up_proj, down_proj"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--steps", "0"], "steps must be an integer >= 1"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--held-out", "0"], "--held-out must be >= 1"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--dtype", "int8"], "--dtype must be"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--max-minutes", "-1"], "--max-minutes must be"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--model", "nope"], "cannot load model 'nope'"),
    (["--recipe", "moe", "--experts", "8", "--density", "0.5", "--json", "no/dir/s.json"],
     "directory of --json does not exist"),
])
def test_user_errors_exit_2(tmp_path, monkeypatch, capsys, argv, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.json").write_text("{}")
    rc = main(["train", "--out", str(tmp_path / "o.json"), "--no-progress"] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1, err


def test_conversion_option_with_a_plan_is_refused(tmp_path, capsys):
    assert train(tmp_path, "--plan", str(saved_plan(tmp_path)), "--features", "down") == 2
    assert "--features is a conversion option: it needs --experts, not --plan" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["--experts", "5", "--density", "0.5"], "cannot convert for model 'tiny:llama'"),
    (["--plan", "PLAN1"], "cannot use --plan for model 'tiny:llama'"),
])
def test_model_mismatch_errors_exit_2(tmp_path, capsys, argv, msg):
    argv = [str(saved_plan(tmp_path, layers=1)) if a == "PLAN1" else a for a in argv]
    assert train(tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
