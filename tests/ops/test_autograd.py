"""Grad mode: every op with a reference has an autograd formula, and a compiled model trains.

Op level: the grad-mode forward equals the op, and backward gives the reference's gradients
w.r.t. x, weights and biases (the masks held fixed). Model level: ``torch.compile(model,
backend="sparse", ...)`` called outside ``torch.no_grad()`` runs forward and ``loss.backward()``
(a user once got "Trying to backward through actsparse.sparse_linear.default but no autograd
formula was registered"), and its parameter gradients equal those of the eager model masked by
hooks (tests/masking.py).
"""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.models import tiny
from actsparse.ops import constants, dispatch
from actsparse.passes.pipeline import run_passes
from actsparse.ops.reference import (cached_sparse_linear_reference, gated_mlp_reference, predicted_mlp_reference,
                                     sparse_linear_reference, wina_cutoffs)
from tests.masking import linear_names, masked

PATHS = ("cpu", "dense")  # the forward path; the backward is the reference's either way


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _flat(v):
    if isinstance(v, (list, tuple)):
        return [t for a in v for t in _flat(a)]
    return [v] if isinstance(v, torch.Tensor) and v.requires_grad else []


def _check(op_call, ref_call, inputs, seed):
    """Forward + backward of ``op_call(*leaves)`` vs ``ref_call(*leaves)``: outputs and gradients."""
    gen = torch.Generator().manual_seed(seed)
    a = [_leaves(*v) if isinstance(v, list) else _leaves(v)[0] if isinstance(v, torch.Tensor) else v
         for v in inputs]
    b = [_leaves(*v) if isinstance(v, list) else _leaves(v)[0] if isinstance(v, torch.Tensor) else v
         for v in inputs]
    out = op_call(*a)
    ref = ref_call(*b)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    refs = list(ref) if isinstance(ref, (list, tuple)) else [ref]
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.requires_grad and o.grad_fn is not None
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    gs = [torch.randn(r.shape, generator=gen) for r in refs]
    torch.autograd.backward(outs, gs)
    torch.autograd.backward(refs, gs)
    la, lb = _flat(a), _flat(b)
    assert len(la) == len(lb) and la
    for p, q in zip(la, lb):
        assert p.grad is not None, "an input that requires grad got no gradient"
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


def _linear_inputs(gen, rows, k, ns, bias):
    x = torch.randn(1, rows, k, generator=gen)
    ws = [torch.randn(n, k, generator=gen) / k**0.5 for n in ns]
    bs = [torch.randn(n, generator=gen) if bias else None for n in ns]
    return x, ws, bs


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 7), k=st.integers(1, 19), ns=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       bias=st.booleans(), per_token=st.booleans(), path=st.sampled_from(PATHS),
       ts=st.lists(st.sampled_from([0.0, 0.3, 0.8, 1e9]), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_sparse_linear_gradients(rows, k, ns, bias, per_token, path, ts, seed):
    x, ws, bs = _linear_inputs(torch.Generator().manual_seed(seed), rows, k, ns, bias)
    thr = ts[: len(ns)]
    with dispatch.forced(path):
        _check(lambda x, ws, bs: torch.ops.actsparse.sparse_linear(x, ws, bs, thr, per_token, 0.5),
               lambda x, ws, bs: sparse_linear_reference(x, ws, bs, thr, per_token), [x, ws, bs], seed)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 7), k=st.integers(1, 19), ns=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       bias=st.booleans(), path=st.sampled_from(PATHS), seed=st.integers(0, 2**16))
def test_channel_sparse_linear_gradients(rows, k, ns, bias, path, seed):
    x, ws, bs = _linear_inputs(torch.Generator().manual_seed(seed), rows, k, ns, bias)
    taus = [wina_cutoffs(w, t) for w, t in zip(ws, (0.2, 0.5, 0.05))]
    scope = constants.ConstantScope()
    key = scope.add("test-grad", *taus)
    try:
        with dispatch.forced(path):
            _check(lambda x, ws, bs: torch.ops.actsparse.channel_sparse_linear(x, ws, bs, key, 0.5),
                   lambda x, ws, bs: sparse_linear_reference(x, ws, bs, taus), [x, ws, bs], seed)
    finally:
        constants.release(tuple(scope.keys))


def test_mixed_none_biases_refuse_grad_instead_of_dropping_it():
    """torch.library passes [None, b] as one opaque value: b would get no gradient, silently."""
    x, ws, bs = _linear_inputs(torch.Generator().manual_seed(0), 2, 8, [3, 4], True)
    b = bs[1].requires_grad_(True)
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="mixes None and tensors"):
        torch.ops.actsparse.sparse_linear(x, ws, [None, b], [0.1, 0.2], False, 0.5)
    with torch.no_grad():  # inference is unaffected
        torch.ops.actsparse.sparse_linear(x, ws, [None, b], [0.1, 0.2], False, 0.5)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 7), k=st.integers(1, 13), f=st.integers(1, 21), bias=st.booleans(),
       per_token=st.booleans(), act=st.sampled_from(["silu", "gelu", "gelu_tanh", "relu"]),
       t=st.sampled_from([0.0, 0.1, 0.4, 1e9]), path=st.sampled_from(PATHS), seed=st.integers(0, 2**16))
def test_gated_mlp_gradients(rows, k, f, bias, per_token, act, t, path, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, k, generator=gen)
    wg, wu = (torch.randn(f, k, generator=gen) / k**0.5 for _ in range(2))
    wd = torch.randn(k, f, generator=gen) / f**0.5
    bs = [torch.randn(n, generator=gen) if bias else None for n in (f, f, k)]
    with dispatch.forced(path):
        _check(lambda x, wg, wu, wd, bg, bu, bd: torch.ops.actsparse.gated_mlp(
                   x, wg, wu, wd, bg, bu, bd, act, t, per_token, 0.5),
               lambda x, wg, wu, wd, bg, bu, bd: gated_mlp_reference(x, wg, wu, wd, bg, bu, bd, act, t, per_token),
               [x, wg, wu, wd, *bs], seed)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 7), k=st.integers(1, 13), f=st.integers(1, 21), bias=st.booleans(),
       density=st.sampled_from([0.0, 0.3, 1.0]), path=st.sampled_from(PATHS), seed=st.integers(0, 2**16))
def test_predicted_mlp_gradients(rows, k, f, bias, density, path, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, k, generator=gen)
    mask = torch.rand(1, rows, f, generator=gen) < density
    wg, wu = (torch.randn(f, k, generator=gen) / k**0.5 for _ in range(2))
    wd = torch.randn(k, f, generator=gen) / f**0.5
    bs = [torch.randn(n, generator=gen) if bias else None for n in (f, f, k)]
    with dispatch.forced(path):
        _check(lambda x, wg, wu, wd, bg, bu, bd: torch.ops.actsparse.predicted_mlp(
                   x, mask, wg, wu, wd, bg, bu, bd, "silu", 0.5),
               lambda x, wg, wu, wd, bg, bu, bd: predicted_mlp_reference(x, mask, wg, wu, wd, bg, bu, bd, "silu"),
               [x, wg, wu, wd, *bs], seed)


@pytest.mark.parametrize("rows", [1, 3, 20])
@pytest.mark.parametrize("bias", [False, True])
def test_cached_sparse_linear_gradients(rows, bias):
    from actsparse.ops import cached_sparse_linear as cached

    x, (w,), (b,) = _linear_inputs(torch.Generator().manual_seed(rows), rows, 12, [5], bias)
    try:
        _check(lambda x, w, b: torch.ops.actsparse.cached_sparse_linear(x, w, b, 0.4, 991),
               lambda x, w, b: cached_sparse_linear_reference(x, w, b, 0.4), [x, w, b], rows)
    finally:
        cached.release_all()


def test_predict_mask_output_needs_no_gradient():
    """The predictor's mask is boolean: grad-mode inputs give an output outside autograd."""
    scope = constants.ConstantScope()
    key = scope.add("test-pm", torch.randn(2, 6), torch.randn(9, 2), torch.randn(9))
    try:
        x = torch.randn(1, 2, 6, requires_grad=True)
        m = torch.ops.actsparse.predict_mask(x, key, 9, 3, 0.0, True)
        assert m.dtype == torch.bool and not m.requires_grad
    finally:
        constants.release(tuple(scope.keys))


# ------------------------------------------------------------------------- compiled model


def _plan(kind, model):
    names = linear_names(model)
    if kind == "teal":
        return actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in names})
    if kind == "cats":
        downs = [n for n in names if n.endswith("down_proj")]
        return actsparse.SparsityPlan.from_thresholds(model, {}, activation_thresholds={d: 0.1 for d in downs})
    if kind == "wina":
        return actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in names}, score="wina")
    return actsparse.SparsityPlan.statistical(0.4)


OPS = {"teal": "sparse_linear", "cats": "gated_mlp", "wina": "channel_sparse_linear", "stat": "sparse_linear"}


def _grads(model, fwd, ids):
    model.zero_grad(set_to_none=True)
    out = fwd(ids).logits
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _compare(model, plan, ids, compiler, monkeypatch):
    seen = []
    real = run_passes

    def spy(gm, plan_, **kw):  # record which actsparse ops each compiled graph calls
        ctx = real(gm, plan_, **kw)
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return ctx

    monkeypatch.setattr(sys.modules["actsparse.compiler.backend"], "run_passes", spy)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="sparse", options={"plan": plan, "compiler": compiler})
    assert torch.is_grad_enabled()
    got_out, got = _grads(model, fast, ids)
    with masked(model, plan):
        ref_out, ref = _grads(model, model, ids)
    torch.testing.assert_close(got_out, ref_out, atol=1e-4, rtol=1e-4)
    assert set(got) == set(ref) and len(got) == len(list(model.parameters()))
    for n in ref:
        scale = ref[n].abs().max().item() + 1e-6
        err = (got[n] - ref[n]).abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, f"{n}: grad err {err} (scale {scale})"
    torch._dynamo.reset()
    return seen


@pytest.mark.parametrize("kind", ["teal", "cats", "wina", "stat"])
@pytest.mark.parametrize("rows", [3, 9], ids=["decode-rows", "prefill-rows"])
def test_compiled_model_backward_matches_masked_eager(kind, rows, monkeypatch):
    model = tiny("llama", num_hidden_layers=1)
    plan = _plan(kind, model)
    ids = torch.randint(1, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(rows))
    seen = _compare(model, plan, ids, "eager", monkeypatch)
    if rows <= 4 or kind == "wina":  # CPU decode rows (and WINA always): the actsparse op itself
        assert any(f"actsparse.{OPS[kind]}" in s for s in seen), seen


@pytest.mark.slow  # Inductor compiles forward and backward: about 25 s with a cold cache
def test_compiled_model_backward_inductor(monkeypatch):
    """Inductor traces the backward (AOTAutograd, fake tensors): TEAL and WINA at decode rows,
    whose ops read backend constants; the lazy relayout must wait for the backward."""
    for kind in ("teal", "wina"):
        model = tiny("llama", num_hidden_layers=1)
        ids = torch.randint(1, model.config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(1))
        seen = _compare(model, _plan(kind, model), ids, "inductor", monkeypatch)
        assert any(f"actsparse.{OPS[kind]}" in s for s in seen), seen


def test_second_grad_call_after_first_backward(monkeypatch):
    """Two training steps through one compiled model (the lazy relayout happens only after a
    call whose outputs need no gradient, so the second step's backward still matches)."""
    model = tiny("llama", num_hidden_layers=1)
    plan = _plan("teal", model)
    ids = torch.randint(1, model.config.vocab_size, (1, 2), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    fast = torch.compile(model, backend="sparse", options={"plan": plan, "compiler": "eager"})
    first = _grads(model, fast, ids)[1]
    second = _grads(model, fast, ids)[1]
    with torch.no_grad():
        fast(ids)  # relayout now; the next grad call recompiles with input-major weights
    third = _grads(model, fast, ids)[1]
    for n in first:
        torch.testing.assert_close(first[n], second[n])
        torch.testing.assert_close(first[n], third[n], atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=st.sampled_from(["qwen2", "gpt2", "phi3"]), rows=st.sampled_from([1, 2, 6]))
def test_compiled_other_archs_backward(arch, rows):
    """Biased q/k/v (qwen2), Conv1D weights (gpt2) and fused projections (phi3) in grad mode."""
    model = tiny(arch, num_hidden_layers=1)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.2 for n in linear_names(model)})
    ids = torch.randint(1, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(rows))
    torch._dynamo.reset()
    fast = torch.compile(model, backend="sparse", options={"plan": plan, "compiler": "eager"})
    got_out, got = _grads(model, fast, ids)
    with masked(model, plan):
        ref_out, ref = _grads(model, model, ids)
    torch.testing.assert_close(got_out, ref_out, atol=1e-4, rtol=1e-4)
    for n in ref:
        scale = ref[n].abs().max().item() + 1e-6
        assert (got[n] - ref[n]).abs().max().item() <= 1e-4 * scale + 1e-6, n
    torch._dynamo.reset()
