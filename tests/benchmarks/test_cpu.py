"""The CPU decode and overlap benchmarks' helpers on a tiny model (no timing claims)."""

from __future__ import annotations

import pytest
import torch

import actsparse
from benchmarks.cpu_decode import agreement, time_variant
from benchmarks.overlap import overlaps, record_masks
from actsparse.models import tiny


def test_overlaps_and_agreement():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    c = torch.tensor([0, 0, 0, 0], dtype=torch.bool)
    assert overlaps([a, b, b, c]) == [0.5, 1.0, 1.0]
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert agreement([1, 2], [1, 2]) == 1.0


def _plan(model, t=0.5):
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return actsparse.SparsityPlan.from_thresholds(model, {n: t for n in names})


def test_time_variant_decodes_without_recompiling():
    model = tiny("llama")
    plan = _plan(model)
    actsparse.prepare(model, plan)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    row = time_variant(model, actsparse.backend(plan), ids, new_tokens=6, repeats=2, max_cache_len=24)
    assert row["tokens_per_s"] > 0 and len(row["runs"]) == 2 and len(row["tokens"]) == 7
    dense = time_variant(model, "inductor", ids, new_tokens=6, repeats=1, max_cache_len=24)
    assert dense["tokens_per_s"] > 0


def test_record_masks_one_mask_per_decode_step():
    model = tiny("llama")
    plan = _plan(model, 0.3)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    masks = record_masks(model, plan, ids, new_tokens=5)
    assert set(masks) == set(plan.thresholds)
    for name, seq in masks.items():
        assert len(seq) == 5 and seq[0].dtype == torch.bool
        assert seq[0].numel() == model.get_submodule(name).in_features


def test_record_masks_exact_and_topk():
    """A relufied model's masks are its down inputs' nonzeros; top-k masks have k entries."""
    from benchmarks.overlap import down_projections, summarize
    from actsparse.train import relufy

    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    downs = down_projections(model)
    topk = record_masks(model, None, ids, new_tokens=4, topk={n: 0.25 for n in downs})
    k = round(0.25 * model.get_submodule(downs[0]).in_features)
    assert set(topk) == set(downs) and all(int(m.sum()) == k for seq in topk.values() for m in seq)
    relu, plan = relufy(model, "relu")
    seen = {}
    hooks = [relu.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append(a[0][0, -1] != 0)) for n in downs]
    masks = record_masks(relu, plan, ids, new_tokens=4)
    for h in hooks:
        h.remove()
    assert set(masks) == set(downs)
    for n in downs:
        assert len(masks[n]) == 4 and torch.equal(masks[n][-1], seen[n][-1])
    s = summarize(masks, {n: "mlp_down" for n in downs})
    assert 0.0 < s["by_role"]["mlp_down"]["density"] < 1.0


def test_relufied_run_interleaves_and_checks(tmp_path):
    """The relufied comparison on a tiny model: four rows timed in rounds, the exact plan
    checked against the eager relufied model."""
    import argparse
    import copy

    from benchmarks.cpu_decode import relufied_run
    from actsparse.train import add_lora, relufy, save_adapters

    base = tiny("llama")
    student, plan = relufy(copy.deepcopy(base), "relu")
    add_lora(student, rank=2)
    path = tmp_path / "a.safetensors"
    save_adapters(student, path, info=plan.info)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    args = argparse.Namespace(adapters=str(path), sparsity=[], method="teal", calib_tokens=64, new_tokens=4,
                              repeats=2, input_sparsity=[0.5])
    result = {"device": "CPU", "rows": []}
    calib = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(4))
    relufied_run(base, calib, None, ids, 16, args, result)
    names = [r["variant"] for r in result["rows"]]
    assert names == ["dense (inductor)", "relufied relu dense (inductor)", "relufied relu exact (sparse)",
                     "relufied relu exact + teal 50% inputs (sparse)"]
    assert len(result["loadavg_rounds"]) == 2
    both = result["rows"][-1]
    assert both["input_sparsity"] == 0.5 and both["check_vs_masked_eager"]["max_rel_logit_diff"] < 1e-3
    exact = result["rows"][-2]
    assert len(exact["runs"]) == 2 and exact["check_vs_masked_eager"]["max_rel_logit_diff"] < 1e-3
    assert 0.0 < exact["sparsity"] < 1.0 and exact["vs_dense"] > 0


def test_random_relu_run_rows(monkeypatch):
    """The random-ReLU mode on a tiny stand-in for the shaped model: dense and exact rows, the
    exact one with its byte bound and a clean check against the eager model."""
    import argparse

    import actsparse.models as models
    from benchmarks.cpu_decode import random_relu_run

    monkeypatch.setattr(models, "shaped", lambda name, **kw: tiny("llama"))
    args = argparse.Namespace(random_relu="llama3-1b", layers=None, new_tokens=3, repeats=2, mlp_sparsity=None,
                              input_sparsity=[])
    result = {"device": "CPU", "rows": []}
    random_relu_run(args, result)
    dense, exact = result["rows"]
    assert dense["variant"] == "relu dense (inductor)" and dense["vs_dense"] == 1.0
    assert 0.2 < exact["sparsity"] < 0.8  # random weights: about half the neurons are zero
    assert 0 < exact["weight_bytes_fraction"] < 1 and exact["speedup_bound_from_bytes"] > 1
    assert exact["check_vs_masked_eager"]["max_rel_logit_diff"] < 1e-3


def test_random_shifted_relu_run_has_the_silu_baseline(monkeypatch):
    """With --mlp-sparsity: the original SiLU model dense first, then the shifted-ReLU model
    dense and with its exact plan, at about the asked MLP sparsity."""
    import argparse

    import actsparse.models as models
    from benchmarks.cpu_decode import random_relu_run

    monkeypatch.setattr(models, "shaped", lambda name, **kw: tiny("llama"))
    args = argparse.Namespace(random_relu="llama3-1b", layers=None, new_tokens=3, repeats=2, mlp_sparsity=0.8,
                              input_sparsity=[0.5])
    result = {"device": "CPU", "rows": []}
    random_relu_run(args, result)
    assert [r["variant"] for r in result["rows"]] == ["dense (inductor)", "shifted-relu dense (inductor)",
                                                      "shifted-relu exact (sparse)",
                                                      "shifted-relu exact + teal 50% inputs (sparse)"]
    exact, both = result["rows"][-2:]
    assert 0.6 < exact["sparsity"] < 0.95 and "shifted-ReLU" in result["model"]
    for r in (exact, both):
        assert r["check_vs_masked_eager"]["max_rel_logit_diff"] < 1e-3
    # TEAL on the other linears reads fewer bytes than the exact plan alone
    assert both["input_sparsity"] == 0.5 and both["weight_bytes_fraction"] < exact["weight_bytes_fraction"]


def test_mlp_sparsity_needs_random_relu(capsys):
    from benchmarks.cpu_decode import main

    with pytest.raises(SystemExit):
        main(["--mlp-sparsity", "0.8"])
    assert "--mlp-sparsity takes --random-relu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--random-relu", "llama3-1b", "--input-sparsity", "0.5"])
    assert "--input-sparsity takes --mlp-sparsity or --adapters" in capsys.readouterr().err


def test_methods_run_interleaves_every_method(tmp_path):
    """Methods compared on a tiny model: dense plus one row per (method, sparsity), timed in
    rounds, each sparse row's greedy tokens compared with its masked eager reference."""
    import argparse

    from benchmarks.cpu_decode import methods_run

    base = tiny("llama")
    g = torch.Generator().manual_seed(4)
    calib = torch.randint(3, 128, (1, 64), generator=g)
    ids = torch.randint(3, 128, (1, 8), generator=g)
    args = argparse.Namespace(methods=["teal", "cats"], sparsity=[0.5], calib_tokens=64, new_tokens=4, repeats=2,
                              ablate=[])
    result = {"device": "CPU", "rows": []}
    methods_run(base, calib, None, ids, 16, args, result)
    assert [r["variant"] for r in result["rows"]] == ["dense (inductor)", "teal 50%", "cats 50%"]
    assert len(result["loadavg_rounds"]) == 2
    for r in result["rows"][1:]:
        assert r["plan"]["method"] == r["variant"].split()[0] and r["sparsity"] == 0.5
        assert len(r["runs"]) == 2 and r["vs_dense"] > 0
        assert r["greedy_prefix_agreement_with_masked_eager"] == 1.0  # fp32: the same masks, the same tokens


def test_methods_run_times_each_ablation_beside_its_variant():
    """--ablate adds each sparse variant without the rewrite, with the option recorded and the
    same greedy tokens (both rewrites are exact)."""
    import argparse

    from benchmarks.cpu_decode import methods_run

    base = tiny("llama")
    g = torch.Generator().manual_seed(5)
    calib = torch.randint(3, 128, (1, 64), generator=g)
    ids = torch.randint(3, 128, (1, 8), generator=g)
    args = argparse.Namespace(methods=["teal"], sparsity=[0.5], calib_tokens=64, new_tokens=4, repeats=1,
                              ablate=["gqa", "fuse"])
    result = {"device": "CPU", "rows": []}
    methods_run(base, calib, None, ids, 16, args, result)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["dense (inductor)", "teal 50%", "teal 50% repeat_kv", "teal 50% unfused"]
    assert rows["teal 50%"]["options"] == {}
    assert rows["teal 50% repeat_kv"]["options"] == {"gqa_attention": False}
    assert rows["teal 50% unfused"]["options"] == {"fuse_gated_product": False}
    for name in ("teal 50%", "teal 50% repeat_kv", "teal 50% unfused"):
        assert rows[name]["greedy_prefix_agreement_with_masked_eager"] == 1.0


def test_ablate_needs_methods(capsys):
    from benchmarks.cpu_decode import main

    with pytest.raises(SystemExit) as e:
        main(["--ablate", "gqa"])
    assert e.value.code == 2 and "--ablate takes --methods" in capsys.readouterr().err
