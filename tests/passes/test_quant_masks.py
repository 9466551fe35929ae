"""Quantized models (``actsparse.quantize``) under ``backend="sparse"``: the masked sites run
``actsparse::quant_sparse_linear`` and the compiled model equals the eager model masked by hooks
(CPU, compiler "eager" and Inductor); plans and calibration carry over from the float model."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.models import tiny
from actsparse.plan import PlanError
from tests.masking import (CountingBackend, assert_close_outputs, assert_matches_masked, linear_names, masked,
                           prefill_decode, token_inputs)

QSL = torch.ops.actsparse.quant_sparse_linear.default


def _model(arch="llama", **kw):
    return tiny(arch, intermediate_size=96, **kw)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_quantized_model_matches_masked_reference(bits, compiler, batch):
    model = _model()
    names = linear_names(model)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 + 0.01 * i for i, n in enumerate(names)})
    actsparse.quantize(model, bits=bits)  # the plan was made on the float model
    ids, dec = token_inputs(batch, 5, 3)
    be = CountingBackend(plan, compiler, QSL)
    assert_matches_masked(model, plan, be, ids, dec)
    assert be.be.found_rules == set(names)
    # decode graphs (batch rows <= the CPU row limit) take the sparse op at every masked site
    assert be.calls >= len(names)
    assert any(f"int{bits}" in s.rule for s in be.be.sites)


def test_statistical_topk_on_quantized_model():
    """Per-token cutoffs (statistical top-k, the no-plan default's rule) on quantized sites."""
    model = actsparse.quantize(_model(), bits=4)
    plan = actsparse.SparsityPlan.statistical(0.4, model)
    ids, dec = token_inputs(1, 4, 2)
    be = CountingBackend(plan, "eager", QSL)
    assert_matches_masked(model, plan, be, ids, dec)
    assert be.calls > 0 and any("stat-topk" in s.rule and "int4" in s.rule for s in be.be.sites)


def test_plan_from_float_model_applies_and_other_models_fail():
    float_model = _model()
    plan = actsparse.SparsityPlan.from_thresholds(float_model, {n: 0.2 for n in linear_names(float_model)})
    quantized = actsparse.quantize(_model(), bits=8)
    plan.validate(quantized)  # same architecture and weight shapes
    assert plan.model == actsparse.SparsityPlan.from_thresholds(quantized, {}).model
    with pytest.raises(PlanError, match="made for a"):
        plan.validate(actsparse.quantize(tiny("qwen2", intermediate_size=96), bits=8))
    with pytest.raises(PlanError, match="weight shapes differ"):
        plan.validate(actsparse.quantize(tiny("llama", intermediate_size=128), bits=8))


def test_plan_file_round_trip_on_quantized_model(tmp_path):
    float_model = _model()
    plan = actsparse.SparsityPlan.from_thresholds(float_model, {n: 0.2 for n in linear_names(float_model)})
    plan.save(tmp_path / "p.json")
    quantized = actsparse.quantize(_model(), bits=4)
    again = actsparse.SparsityPlan.load(tmp_path / "p.json", model=quantized)
    assert again.thresholds == plan.thresholds


def test_calibration_runs_on_quantized_model():
    model = actsparse.quantize(_model(num_hidden_layers=1), bits=8)
    tokens = torch.randint(3, 128, (600,), generator=torch.Generator().manual_seed(0))
    plan = actsparse.calibrate(model, tokens, "teal", 0.5, token_budget=512, seq_len=32, progress=False)
    assert set(plan.thresholds) == set(linear_names(model))
    plan.validate(_model(num_hidden_layers=1))  # and the plan fits the float model too
    ids, dec = token_inputs(1, 4, 2)
    torch._dynamo.reset()
    got = prefill_decode(torch.compile(model.forward, backend=actsparse.backend(plan, compiler="eager")),
                         model, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    assert_close_outputs(got, ref)


@pytest.mark.parametrize("kind", ["cats", "wina"])
def test_rules_needing_float_weights_are_refused(kind):
    model = _model()
    names = linear_names(model)
    if kind == "cats":
        downs = [n for n in names if n.endswith("down_proj")]
        plan = actsparse.SparsityPlan.from_thresholds(model, {}, activation_thresholds={n: 0.1 for n in downs})
    else:
        plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.1 for n in names}, score="wina")
    actsparse.quantize(model, bits=8)
    ids, _ = token_inputs(1, 3, 0)
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, backend=actsparse.backend(plan, compiler="eager"))
    with pytest.raises(Exception, match="not supported on quantized linears"):
        with torch.no_grad():
            fwd(input_ids=ids)
