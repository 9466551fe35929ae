"""``actsparse::held_quant_sparse_linear``: the weight held as backend constants, every dispatch
path forced, against its pure-torch reference on random inputs; its gradient; its fake."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.kernels import triton as tk
from actsparse.ops import constants, dispatch
from actsparse.ops.held_quant_sparse_linear import held_quant_sparse_linear_op as OP
from actsparse.ops.held_quant_sparse_linear import held_quant_sparse_linear_reference
from actsparse.quant.storage import quantize_weight

HAS_TRITON = tk.is_available() and tk.interpreting() or torch.cuda.is_available()
PATHS = ["cpu", "dense"] + (["triton"] if HAS_TRITON else [])


def _held(bits, group, n, k, seed):
    qw = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / 4, bits, group)
    scope = constants.ConstantScope()
    key = scope.add("test", qw.qweight, qw.scales, *([] if qw.offsets is None else [qw.offsets]))
    return qw, scope, key


@settings(max_examples=25, deadline=None, derandomize=True)
@given(fmt=st.sampled_from([(8, None), (8, 32), (4, 32), (4, 64)]), rows=st.integers(1, 4),
       groups=st.integers(1, 3), half=st.integers(1, 20), t=st.floats(0.0, 1.5), per_token=st.booleans(),
       bias=st.booleans(), path=st.sampled_from(PATHS), seed=st.integers(0, 2**16))
def test_matches_reference(fmt, rows, groups, half, t, per_token, bias, path, seed):
    bits, group = fmt
    k, n = (group or 32) * groups, 2 * half
    qw, scope, key = _held(bits, group, n, k, seed)
    try:
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(rows, k, generator=g)
        b = torch.randn(n, generator=g) if bias else None
        args = (x, key, b, t, per_token, bits, qw.group_size, n, 0.5)
        with dispatch.forced(path):
            out = OP(*args)
        torch.testing.assert_close(out, held_quant_sparse_linear_reference(*args), rtol=1e-5, atol=1e-5)
    finally:
        constants.release(tuple(scope.keys))


def test_gradient_matches_reference():
    qw, scope, key = _held(8, 32, 6, 64, 0)
    try:
        x = torch.randn(2, 64, requires_grad=True)
        b = torch.randn(6, requires_grad=True)
        OP(x, key, b, 0.4, False, 8, 32, 6, 0.5).square().sum().backward()
        gx, gb = x.grad.clone(), b.grad.clone()
        x.grad = b.grad = None
        held_quant_sparse_linear_reference(x, key, b, 0.4, False, 8, 32, 6, 0.5).square().sum().backward()
        torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb, b.grad, rtol=1e-5, atol=1e-5)
    finally:
        constants.release(tuple(scope.keys))


def test_fake_and_released_key():
    qw, scope, key = _held(4, 32, 8, 64, 1)
    with torch._subclasses.FakeTensorMode():
        out = OP(torch.empty(3, 1, 64), key, None, 0.1, False, 4, 32, 8, 0.5)
    assert out.shape == (3, 1, 8)
    constants.release(tuple(scope.keys))
    with pytest.raises(RuntimeError, match="not registered"):
        OP(torch.randn(1, 64), key, None, 0.1, False, 4, 32, 8, 0.5)


def test_compile_time_reserve_sizes_the_kernel_workspace(monkeypatch):
    """Both quantized ops reserve the Triton workspace for their output width at compile time."""
    from actsparse.ops import held_quant_sparse_linear as held
    from actsparse.ops import quant_sparse_linear as qsl
    from actsparse.ops.spec import OPS

    calls = []
    monkeypatch.setattr(qsl, "reserve_quant_gemv", lambda device, n, k: calls.append(n))
    monkeypatch.setattr(held, "reserve_quant_gemv", lambda device, n, k: calls.append(n))
    qw = quantize_weight(torch.randn(12, 64) / 4, 4, 32)
    x = torch.randn(1, 64)
    qsl.SPEC.reserve(dict(x=x, qweight=qw.qweight, bits=4))
    OPS[OP].reserve(dict(x=x, out_features=12))
    assert calls == [12, 12]
