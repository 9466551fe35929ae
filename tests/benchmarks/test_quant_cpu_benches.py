"""The CPU quantized benches' own pieces: the int8pack_mm linear of ``cpu_decode_quant`` and the
quantization-cost check of ``accuracy_quant``; the observing backend on a tiny quantized model."""

from __future__ import annotations

import copy

import pytest
import torch

import actsparse
from actsparse.models import tiny
from benchmarks.accuracy_quant import QuantMaskObserver, QuantObservingBackend, check
from benchmarks.cpu_decode_quant import Int8PackLinear, int8pack


def test_int8pack_linear_matches_int8_storage():
    lin = torch.nn.Linear(48, 30, bias=True)
    q = Int8PackLinear(lin)
    x = torch.randn(3, 2, 48)
    ref = torch.nn.functional.linear(x, q.w.float() * q.scale[:, None], lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-4)
    model = int8pack(tiny("llama", intermediate_size=96))
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8PackLinear)
    assert not isinstance(model.get_output_embeddings(), Int8PackLinear)


def test_check_compares_sparse_and_dense_quantization_cost():
    rows = [{"format": f, "target": t, "ppl": p} for f, t, p in [
        ("fp32", None, 10.0), ("fp32", 0.5, 12.0), ("int8", None, 10.5), ("int8", 0.5, 12.4)]]
    got = check(rows, [0.5])["int8"]
    assert got["ppl_increase_over_fp32"] == {"0": 0.5, "0.5": 0.4}
    assert got["met_absolute"] == {"0.5": True}
    assert got["met_relative"] == {"0.5": True}


def test_observer_counts_quantized_sites():
    from actsparse.plan import SparsityPlan

    model = tiny("llama", intermediate_size=96)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    plan = SparsityPlan.from_thresholds(model, {n: 0.5 for n in names})
    q = actsparse.quantize(copy.deepcopy(model), bits=8)
    total = sum(m.in_features * m.out_features for n, m in model.named_modules() if n in names)
    obs = QuantMaskObserver(total)
    torch._dynamo.reset()
    fwd = torch.compile(q, backend=QuantObservingBackend(plan, obs))
    fwd(torch.randint(3, 128, (1, 5)))  # prefill: masked input into the dense quantized linear
    assert 0.2 < obs.sparsity() < 0.8 and len(obs.sums) == len(names)
    obs.sums.clear()
    fwd(torch.randint(3, 128, (1, 1)))  # one row: the quantized sparse op
    assert 0.2 < obs.sparsity() < 0.8 and len(obs.sums) == len(names)


def test_paired_ratios_cancel_load_between_rounds():
    from benchmarks.cpu_decode_quant import paired

    rows = [{"variant": "dense fp32 (inductor)", "runs": [10.0, 5.0, 2.0]},
            {"variant": "ours", "runs": [20.0, 10.0, 4.0]}]
    paired(rows, "dense fp32 (inductor)")
    assert rows[1]["vs_dense_paired"] == 2.0 and rows[0]["vs_dense_paired"] == 1.0


def test_variants_share_weights_and_quantize_the_head():
    import argparse

    from benchmarks.cpu_decode_quant import build_variants

    base = tiny("llama", intermediate_size=96)
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    plans = {0.5: actsparse.SparsityPlan.from_thresholds(base, {n: 0.5 for n in names})}
    args = argparse.Namespace(families=["int8"], quantize_head=True, no_int8pack=False)
    variants = build_variants(args, base, plans, None)
    assert [v["variant"] for v in variants] == ["dense fp32 (inductor)", "dense int8 (int8pack_mm, inductor)",
                                                "dense int8 (actsparse, inductor)",
                                                "dense int8 (actsparse native kernel)", "ours int8 50%"]
    q8, ours = variants[2]["model"], variants[4]["model"]
    assert q8 is not ours and q8.lm_head.qweight is ours.lm_head.qweight  # same tensors, own modules
    assert q8.lm_head.bits == 8 and isinstance(variants[1]["model"].lm_head, Int8PackLinear)
    assert q8.get_input_embeddings().weight is base.get_input_embeddings().weight
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        ref = base(ids).logits
        for v in variants[1:3]:
            out = v["model"](ids).logits
            assert float((out - ref).norm() / ref.norm()) < 0.05


def test_int4_clip_variants_are_labelled():
    from benchmarks.accuracy_quant import build_parser, variants

    assert [v[0] for v in variants(64)] == ["fp32", "int8", "int4-g64"]
    assert variants(32, "mse-act")[-1] == ("int4-g32-mseact", 4, 32)
    assert build_parser().parse_args(["--int4-clip", "mse"]).int4_clip == "mse"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--int4-clip", "gptq"])


def test_rounding_variants_and_their_quantize_options():
    from benchmarks.accuracy_quant import build_parser, quantize_options, variants

    assert [v[0] for v in variants(64, "mse-act", "gptq")] == ["fp32", "int8-gptq", "int4-g64-mseact-gptq"]
    assert variants(32, "minmax", "gptq-plan")[1] == ("int8-gptqplan", 8, None)
    ids = torch.zeros(2, 8, dtype=torch.long)
    assert quantize_options(8, "mse-act", "nearest", ids) == {}
    assert quantize_options(4, "minmax", "nearest", ids) == {}
    assert quantize_options(4, "mse-act", "nearest", ids) == {"clip": "mse", "tokens": ids}
    assert quantize_options(8, "mse", "gptq", ids) == {"rounding": "gptq", "tokens": ids}
    assert quantize_options(4, "mse", "gptq-plan", ids) == {"clip": "mse", "rounding": "gptq", "tokens": ids}
    assert quantize_options(8, "mse", "gptq-act-plan", ids) == {"rounding": "gptq-act", "tokens": ids}
    assert variants(64, "minmax", "gptq-act-plan")[2][0] == "int4-g64-gptqactplan"
    model = tiny("llama", intermediate_size=96)
    for bits in (8, 4):  # every option set is one actsparse.quantize accepts
        for clip in ("minmax", "mse", "mse-act"):
            for rounding in ("nearest", "gptq", "gptq-act"):
                actsparse.quantize(copy.deepcopy(model), bits=bits, group_size=32,
                                   **quantize_options(bits, clip, rounding, torch.randint(3, 100, (2, 8))))
    assert build_parser().parse_args(["--rounding", "gptq-plan"]).rounding == "gptq-plan"
    assert build_parser().parse_args([]).tasks == [] and build_parser().parse_args(["--tasks", "piqa"]).tasks == ["piqa"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--rounding", "awq"])
