"""GPTQ rounding (``actsparse.quant.gptq``) against round-to-nearest, its reference.

With a diagonal Hessian GPTQ has no correlation to exploit and must give round-to-nearest's
codes exactly; on correlated inputs it must give a smaller output error than round-to-nearest
in the same storage. The Hessians are checked against ones computed by hand, with and without
a plan's masks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.models import tiny
from actsparse.quant import QuantLinear, quantizable_linears, quantize_weight
from actsparse.quant.gptq import gptq_quantize, hessian_chunks, input_hessians

FORMATS = [(8, None), (8, 32), (4, 32), (4, 64)]


def _correlated_inputs(k: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(rows, k, generator=g) @ mix * torch.rand(k, generator=g).add(0.2)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,gs,clip", [(b, g, "minmax") for b, g in FORMATS] + [(4, 32, "mse"), (4, 64, "mse")])
def test_diagonal_hessian_gives_round_to_nearest(bits, gs, clip, act_order):
    """No correlation, no updates: GPTQ's codes are round-to-nearest's, in either order (act
    order rounds a diagonal of distinct values in a shuffled channel order)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)
    h = torch.diag(torch.rand(128, generator=g) + 0.5) if act_order else torch.eye(128)
    got = gptq_quantize(w, h, bits, gs, clip, act_order=act_order)
    ref = quantize_weight(w, bits, gs, clip, h.diagonal() if clip == "mse" else None)  # clip weighted as GPTQ's
    assert torch.equal(got.qweight, ref.qweight)
    torch.testing.assert_close(got.scales, ref.scales)
    if bits == 4:
        torch.testing.assert_close(got.offsets, ref.offsets)


@settings(max_examples=12, deadline=None)
@given(fmt=st.sampled_from(FORMATS), n=st.sampled_from([2, 18, 40]), groups=st.integers(1, 5),
       seed=st.integers(0, 2 ** 16), act_order=st.booleans())
def test_output_error_below_round_to_nearest(fmt, n, groups, seed, act_order):
    bits, gs = fmt
    k = (gs or 32) * groups
    x = _correlated_inputs(k, 4 * k, seed)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    h = x.t() @ x / x.shape[0]
    ref = x @ w.t()
    err_gptq = (x @ gptq_quantize(w, h, bits, gs, act_order=act_order).dequantize().t() - ref).norm()
    err_rtn = (x @ quantize_weight(w, bits, gs).dequantize().t() - ref).norm()
    assert err_gptq <= err_rtn * 1.001, (float(err_gptq), float(err_rtn))


def test_storage_is_the_round_to_nearest_form():
    w = torch.randn(40, 96, dtype=torch.bfloat16)
    x = _correlated_inputs(96, 300, 0)
    got = gptq_quantize(w, x.t() @ x / 300, 4, 32)
    ref = quantize_weight(w, 4, 32)
    for a, b in ((got.qweight, ref.qweight), (got.scales, ref.scales), (got.offsets, ref.offsets)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert (got.bits, got.group_size, got.out_features, got.in_features) == (4, 32, 40, 96)


def test_hessians_match_hand_computed_with_and_without_plan():
    model = tiny("llama", intermediate_size=96)
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    linears = quantizable_linears(model)
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    seen = {}
    hooks = [linears[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n in (q, down)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    hs = input_hessians(model, linears, ids, batch=2)
    for n in (q, down):
        x = seen[n].float()
        torch.testing.assert_close(hs[n], x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    plan = actsparse.SparsityPlan(thresholds={down: float(seen[down].abs().median())})
    masked = input_hessians(model, linears, ids, plan)
    x = seen[down].float()
    x = torch.where(x.abs() > plan.thresholds[down], x, torch.zeros(()))
    torch.testing.assert_close(masked[down], x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("rounding", ["gptq", "gptq-act"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_with_gptq_is_closer_on_its_tokens(bits, rounding):
    """The whole model: GPTQ's logits are no further from the float model's than nearest
    rounding's on the tokens it was fitted on, and the storage is the usual QuantLinear."""
    base = tiny("llama", intermediate_size=96)
    ids = torch.randint(3, base.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    fresh = lambda: tiny("llama", intermediate_size=96)  # noqa: E731  (same seed: same weights)
    rtn = actsparse.quantize(fresh(), bits=bits, group_size=32)
    gptq = actsparse.quantize(fresh(), bits=bits, group_size=32, rounding=rounding, tokens=ids)
    lin = gptq.model.layers[0].mlp.down_proj
    assert isinstance(lin, QuantLinear) and lin.bits == bits and lin.group_size == 32
    with torch.no_grad():
        err_rtn = float((rtn(ids).logits - ref).norm())
        err_gptq = float((gptq(ids).logits - ref).norm())
    assert err_gptq < err_rtn


def test_gptq_options_are_validated():
    ids = torch.randint(3, 100, (1, 8))
    model = tiny("llama", intermediate_size=96)
    with pytest.raises(ValueError, match="rounding must be one of"):
        actsparse.quantize(model, bits=4, rounding="awq")
    for rounding in ("gptq", "gptq-act"):
        with pytest.raises(ValueError, match="needs tokens="):
            actsparse.quantize(model, bits=4, rounding=rounding)
    with pytest.raises(ValueError, match="takes rounding='gptq'"):
        actsparse.quantize(model, bits=4, plan=actsparse.SparsityPlan())
    with pytest.raises(TypeError, match="SparsityPlan"):
        actsparse.quantize(model, bits=4, rounding="gptq", tokens=ids, plan={"a": 1})
    with pytest.raises(ValueError, match="must be \\[96, 96\\]"):
        gptq_quantize(torch.randn(4, 96), torch.eye(64), 8)
    with pytest.raises(ValueError, match="int4 needs a group_size"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), 4)
    for bad in (0, -1.0, True, "4"):
        with pytest.raises(ValueError, match="hessian_memory_gb must be a positive number"):
            actsparse.quantize(model, bits=8, rounding="gptq", tokens=ids, hessian_memory_gb=bad)


def test_hessian_pass_stops_after_its_block():
    """Once every linear asked for has seen its input the forward stops (here block 0's: the
    output head never runs)."""
    model = tiny("llama", intermediate_size=96)
    calls = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, a: calls.append(1))
    block0 = {n: m for n, m in quantizable_linears(model).items() if ".layers.0." in n}
    ids = torch.randint(3, 100, (4, 8))
    hs = input_hessians(model, block0, ids, batch=2)
    assert set(hs) == set(block0) and not calls
    with torch.no_grad():
        model(ids)
    assert calls  # the hook works: a full forward reaches the head


def test_linears_on_one_input_share_one_hessian():
    """q/k/v (and gate/up) read the same tensor: one matrix between them, equal to each one's
    own; a plan that masks q alone gives q its own matrix and leaves k and v sharing."""
    model = tiny("llama", intermediate_size=96)
    ids = torch.randint(3, model.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(1))
    linears = quantizable_linears(model)
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    hs = input_hessians(model, linears, ids, batch=2)
    assert hs[attn + "q_proj"] is hs[attn + "k_proj"] is hs[attn + "v_proj"]
    assert hs[mlp + "gate_proj"] is hs[mlp + "up_proj"] and hs[mlp + "down_proj"] is not hs[mlp + "up_proj"]
    assert hs[attn + "o_proj"] is not hs[attn + "q_proj"]
    alone = input_hessians(model, {attn + "k_proj": linears[attn + "k_proj"]}, ids, batch=2)
    assert torch.equal(alone[attn + "k_proj"], hs[attn + "k_proj"])
    plan = actsparse.SparsityPlan(thresholds={attn + "q_proj": 0.5})
    masked = input_hessians(model, linears, ids, plan, batch=2)
    assert masked[attn + "q_proj"] is not masked[attn + "k_proj"]
    assert masked[attn + "k_proj"] is masked[attn + "v_proj"]
    assert torch.equal(masked[attn + "k_proj"], hs[attn + "k_proj"])
    assert not torch.allclose(masked[attn + "q_proj"], hs[attn + "q_proj"])


def test_hessian_chunks_keep_order_and_bound():
    model = tiny("llama", intermediate_size=96)
    linears = quantizable_linears(model)
    assert hessian_chunks(linears, None) == [list(linears)]
    size = {n: 4 * m.in_features ** 2 for n, m in linears.items()}
    bound = 3 * 4 * 64 ** 2
    chunks = hessian_chunks(linears, bound)
    assert [n for c in chunks for n in c] == list(linears) and len(chunks) > 1
    assert all(sum(size[n] for n in c) <= bound or len(c) == 1 for c in chunks)
    assert all(len(c) == 1 for c in hessian_chunks(linears, 1))


@pytest.mark.parametrize("rounding,bits", [("gptq", 8), ("gptq-act", 4)])
def test_memory_bound_gives_the_same_weights(rounding, bits):
    """Hessians taken a few linears at a time (a forward prefix each) or all in one pass: the
    same quantized model, bit for bit, with and without a plan (so no chunk saw an earlier
    chunk's quantized weights)."""
    ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(2))
    plan = actsparse.SparsityPlan(thresholds={"model.layers.0.mlp.down_proj": 0.05,
                                              "model.layers.1.self_attn.q_proj": 0.3})
    for p in (None, plan):
        one = actsparse.quantize(tiny("llama", intermediate_size=96), bits=bits, group_size=32, rounding=rounding,
                                 tokens=ids, plan=p, hessian_memory_gb=None)
        many = actsparse.quantize(tiny("llama", intermediate_size=96), bits=bits, group_size=32, rounding=rounding,
                                  tokens=ids, plan=p, hessian_memory_gb=2 * 4 * 96 ** 2 / 2 ** 30)
        a, b = one.state_dict(), many.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

