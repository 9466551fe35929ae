"""torchao-quantized models under ``backend="sparse"``: the masked torchao linears run
``actsparse::held_quant_sparse_linear`` over our input-major copy of torchao's quantized data,
and the compiled model equals the torchao model masked by hooks. Skipped without torchao."""

from __future__ import annotations

import warnings

import pytest
import torch

torchao = pytest.importorskip("torchao")
warnings.filterwarnings("ignore", module="torchao")

from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_  # noqa: E402
from torchao.quantization.granularity import PerAxis, PerGroup  # noqa: E402

import actsparse  # noqa: E402
from actsparse.models import tiny  # noqa: E402
from actsparse.ops.held_quant_sparse_linear import held_quant_sparse_linear_op  # noqa: E402
from actsparse.quant import torchao_weights as tw  # noqa: E402
from actsparse.quant.storage import dequantize_input_major  # noqa: E402
from tests.masking import (  # noqa: E402
    CountingBackend, assert_matches_masked, linear_names, masked, prefill_decode, token_inputs)

CONFIGS = {
    # set_inductor_config=False: torchao would otherwise change Inductor's options for the whole session
    "int8": lambda: Int8WeightOnlyConfig(set_inductor_config=False),
    "int8-g32": lambda: Int8WeightOnlyConfig(granularity=PerGroup(32), set_inductor_config=False),
    "intx-int4-g32": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    "intx-int8": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
}


def _model(**kw):
    return tiny("llama", intermediate_size=96, **kw)


def _quantized(config: str, **kw):
    model = _model(**kw)
    quantize_(model, CONFIGS[config]())
    return model


@pytest.mark.parametrize("config", list(CONFIGS))
def test_input_major_storage_equals_torchao_dequantised_weight(config):
    model = _quantized(config)
    for name in linear_names(model):
        w = model.get_submodule(name).weight
        qw = tw.to_input_major(w)
        ours = dequantize_input_major(qw.qweight, qw.scales, qw.offsets, qw.bits, qw.group_size).t()
        torch.testing.assert_close(ours, w.dequantize().float(), rtol=1e-6, atol=1e-7)
        assert qw.qweight.dtype in (torch.int8, torch.uint8)  # quantized data, no float copy
        assert qw.bits == (4 if "int4" in config else 8) and qw.group_size == (32 if "g32" in config else 0)


@pytest.mark.parametrize("config", ["int8", "int8-g32", "intx-int4-g32"])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_torchao_model_matches_masked_reference(config, compiler, batch):
    if compiler == "inductor" and config != "int8":
        pytest.skip("Inductor is checked on Int8WeightOnlyConfig; eager covers the other layouts")
    float_model = _model()
    names = linear_names(float_model)
    plan = actsparse.SparsityPlan.from_thresholds(float_model, {n: 0.3 + 0.01 * i for i, n in enumerate(names)})
    model = _quantized(config)  # the same weights (tiny's seed), quantized by torchao
    plan.validate(model)  # a plan made on the float model applies
    ids, dec = token_inputs(batch, 5, 3)
    be = CountingBackend(plan, compiler, held_quant_sparse_linear_op)
    assert_matches_masked(model, plan, be, ids, dec)
    assert be.be.found_rules == set(names)
    assert be.calls >= len(names)  # every masked site of the decode graphs runs our kernel
    assert any(s.module == "lm_head" and "native" in s.rule for s in be.be.sites)  # the head, unmasked
    assert any("torchao" in s.rule for s in be.be.sites)


def test_conversion_is_cached_on_the_parameter(monkeypatch):
    model = _quantized("int8")
    names = linear_names(model)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in names})
    seen = []
    real = tw.to_input_major
    monkeypatch.setattr(tw, "to_input_major", lambda w: seen.append(w) or real(w))
    ids, dec = token_inputs(1, 4, 2)
    torch._dynamo.reset()
    prefill_decode(torch.compile(model.forward, backend=actsparse.backend(plan, compiler="eager")), model, ids, dec)
    torch._dynamo.reset()  # a new compilation reads the cached storage
    prefill_decode(torch.compile(model.forward, backend=actsparse.backend(plan, compiler="eager")), model, ids, dec)
    # every masked linear, and on the CPU the unmasked int8 head too (quant_dense_cpu), once each
    assert len(seen) == len(names) + 1 and len({id(w) for w in seen}) == len(names) + 1


def test_grad_mode_matches_reference_gradient():
    model = _quantized("int8", num_hidden_layers=1)
    names = linear_names(model)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in names})
    ids = torch.randint(1, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings().weight
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, backend=actsparse.backend(plan, compiler="eager"))
    fwd(input_ids=ids).logits.square().sum().backward()
    got = emb.grad.clone()
    emb.grad = None
    with masked(model, plan):
        model(input_ids=ids).logits.square().sum().backward()
    torch.testing.assert_close(got, emb.grad, rtol=1e-4, atol=1e-5)


def test_unsupported_configs_are_named():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    model = _model()
    quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    with pytest.raises(tw.UnsupportedTorchaoWeight,
                       match=r"torchao 0\.\d+.*Int8DynamicActivationInt8WeightConfig.*quantizes activations.*Supported"):
        tw.to_input_major(model.model.layers[0].mlp.up_proj.weight)
    model = _model()
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16)))
    with pytest.raises(tw.UnsupportedTorchaoWeight, match="group size 16"):
        tw.to_input_major(model.model.layers[0].mlp.up_proj.weight)
    # and through the backend: compiling names the weight type
    names = linear_names(model)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in names})
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, backend=actsparse.backend(plan, compiler="eager"))
    with pytest.raises(Exception, match="IntxUnpackedToInt8Tensor"):
        with torch.no_grad():
            fwd(input_ids=torch.tensor([[3, 4]]))


def test_old_torchao_versions_are_refused(monkeypatch):
    model = _quantized("int8")
    monkeypatch.setattr(torchao, "__version__", "0.12.0")
    with pytest.raises(tw.UnsupportedTorchaoWeight, match="torchao 0.12.0 is older"):
        tw.to_input_major(model.model.layers[0].mlp.up_proj.weight)


def test_calibration_runs_on_torchao_model():
    model = _quantized("int8", num_hidden_layers=1)
    tokens = torch.randint(3, 128, (600,), generator=torch.Generator().manual_seed(0))
    plan = actsparse.calibrate(model, tokens, "teal", 0.5, token_budget=512, seq_len=32, progress=False)
    assert set(plan.thresholds) == set(linear_names(model))
    plan.validate(_model(num_hidden_layers=1))  # the plan fits the float model too


@pytest.mark.parametrize("config", ["int8", "int8-g32", "intx-int4-g32"])
def test_sites_on_one_input_share_one_call(config):
    """With one threshold per input, q/k/v and gate/up run as one joined call each (their
    converted weights side by side, the output split), still equal to the masked reference."""
    float_model = _model()
    names = linear_names(float_model)
    shared = {n: (0.3 if "q_proj" in n or "k_proj" in n or "v_proj" in n else 0.35 if "o_proj" in n else
                  0.4 if "gate_proj" in n or "up_proj" in n else 0.45) for n in names}
    counts, rules = {}, {}
    for label, thresholds in (("shared", shared), ("distinct", {n: 0.3 + 0.01 * i for i, n in enumerate(names)})):
        plan = actsparse.SparsityPlan.from_thresholds(float_model, thresholds)
        be = CountingBackend(plan, "eager", held_quant_sparse_linear_op)
        assert_matches_masked(_quantized(config), plan, be, *token_inputs(1, 5, 3))
        counts[label] = be.calls
        rules[label] = {s.module: s.rule for s in be.be.sites}
    assert counts["shared"] < counts["distinct"]
    assert not any("shared" in r for r in rules["distinct"].values())
    rules = rules["shared"]
    assert "(shared x3)" in rules["model.layers.0.self_attn.k_proj"]
    assert "(shared x2)" in rules["model.layers.0.mlp.up_proj"]
