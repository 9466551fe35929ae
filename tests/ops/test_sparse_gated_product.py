"""``actsparse::sparse_gated_product`` on every dispatch branch against its one reference
(act(gate x_g) * up x_u in fp32), and the kernels' gated epilogue in both families, in Triton's
CPU interpreter: odd widths, 1 and several rows, every activation, fixed and per-token cutoffs."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from actsparse.ops import dispatch
from actsparse.ops.reference import ACTIVATIONS, gated_product_reference
from actsparse.ops.sparse_gated_product import sparse_gated_product as op

EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the Triton branch runs the interpreter on CPU tensors")


def _case(m, k, n, dtype, seed, per_token=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    ws = [(torch.randn(n, k, generator=g) / k ** 0.5).to(dtype) for _ in range(2)]
    ws = [ws[0].t().contiguous().t(), ws[1]]  # input-major and row-major
    ts = [0.6, 1.1] if per_token else [float(x.abs().float().quantile(0.4)), float(x.abs().float().quantile(0.6))]
    return x, ws, ts


def _close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = float(ref.float().abs().max()) + 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=4 * EPS[dtype], atol=4 * EPS[dtype] * scale)


@pytest.mark.parametrize("path", ["dense", "cpu", pytest.param("triton", marks=interpreted)])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("m,k,n,per_token", [(1, 40, 24, False), (3, 33, 50, True), (5, 64, 17, False)])
def test_every_branch_matches_the_reference(path, act, m, k, n, per_token):
    x, ws, ts = _case(m, k, n, torch.float32, seed=m + k + n, per_token=per_token)
    with dispatch.forced(path):
        out = op(x, ws, ts, act, per_token, 0.5)
    _close(out, gated_product_reference(x, ws, ts, act, per_token), torch.float32)


@interpreted
@pytest.mark.parametrize("family", ["compact", "predicated", "elect"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4])
def test_kernel_epilogue_in_both_families(family, dtype, m):
    from actsparse.kernels.triton import sparse_gemv as sg

    x, ws, ts = _case(m, 48, 40, dtype, seed=7)
    with sg.forced_family(family):
        h = sg.launch_sparse_linear(x, ws, [None, None], ts, None, 0.5, epilogue="silu")
        again = sg.launch_sparse_linear(x, ws, [None, None], ts, None, 0.5, epilogue="silu")  # workspace reset
    assert len(h) == 1
    ref = gated_product_reference(x, ws, ts, "silu")
    _close(h[0], ref, dtype)
    _close(again[0], ref, dtype)


@interpreted
def test_epilogue_refuses_what_it_cannot_fuse():
    from actsparse.kernels.triton import sparse_gemv as sg

    x, ws, ts = _case(1, 32, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="epilogue must be one of"):
        sg.launch_sparse_linear(x, ws, [None, None], ts, epilogue="tanh")
    with pytest.raises(ValueError, match="two outputs of one width"):
        sg.launch_sparse_linear(x, ws, [torch.zeros(16), None], ts, epilogue="silu")
    with pytest.raises(ValueError, match="two outputs of one width"):
        sg.launch_sparse_linear(x, [ws[0], ws[1][:8]], [None, None], ts, epilogue="silu")


def test_op_needs_gate_and_up():
    x, ws, ts = _case(1, 32, 16, torch.float32, seed=2)
    with pytest.raises(ValueError, match="2 weights"):
        op(x, ws[:1], ts[:1], "silu", False, 0.5)


def test_gradients_follow_the_reference():
    x, ws, ts = _case(2, 24, 12, torch.float32, seed=3)
    ws = [w.clone().requires_grad_() for w in ws]
    xg = x.clone().requires_grad_()
    op(xg, ws, ts, "gelu_tanh", False, 0.5).square().sum().backward()
    xr = x.clone().requires_grad_()
    wr = [w.detach().clone().requires_grad_() for w in ws]
    gated_product_reference(xr, wr, ts, "gelu_tanh").square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    for a, b in zip(ws, wr):
        torch.testing.assert_close(a.grad, b.grad)
