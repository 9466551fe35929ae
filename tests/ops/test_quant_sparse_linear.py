"""``actsparse::quant_sparse_linear``: every dispatch path, forced, equals the reference; the CPU
path reads only active rows; the fake gives the right shape under torch.compile."""

from __future__ import annotations

import pytest
import torch

import actsparse.ops.quant_sparse_linear as qsl
from actsparse.kernels import triton as tk
from actsparse.ops import dispatch
from actsparse.ops.reference import quant_sparse_linear_reference
from actsparse.quant.storage import quantize_weight

OP = torch.ops.actsparse.quant_sparse_linear.default
HAS_TRITON = tk.is_available() and tk.interpreting() or torch.cuda.is_available()
PATHS = [pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")),
         "cpu", "dense"]


def _case(bits, rows, lead3, bias, seed, k=64, n=38):
    g = torch.Generator().manual_seed(seed)
    grouped = bits == "8g"  # int8 with one scale per group of 32 input channels
    qw = quantize_weight(torch.randn(n, k, generator=g) / 4, 8 if grouped else bits, 32 if bits != 8 else None)
    shape = (rows, 1, k) if lead3 else (rows, k)
    x = torch.randn(*shape, generator=g)
    b = torch.randn(n, generator=g) / 10 if bias else None
    return qw, x, b


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [8, 4, "8g"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("per_token", [False, True])
def test_paths_match_reference(path, bits, rows, per_token):
    qw, x, b = _case(bits, rows, rows == 3, True, seed=len(str(bits)) * 10 + rows)
    bits = qw.bits
    t = 0.8 if per_token else 0.6
    with dispatch.forced(path):
        out = OP(x, qw.qweight, qw.scales, qw.offsets, b, t, per_token, bits, qw.group_size, 0.5)
    ref = quant_sparse_linear_reference(x, qw.qweight, qw.scales, qw.offsets, b, t, per_token, bits, qw.group_size)
    assert out.shape == ref.shape == (*x.shape[:-1], 38)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_path_reads_active_rows_only(monkeypatch):
    qw, x, _ = _case(4, 1, False, False, seed=3)
    x[:, :32] = 0  # group 0 inactive
    seen = {}
    real = torch.Tensor.index_select

    def spy(self, dim, idx):
        seen["rows"] = idx.clone()
        return real(self, dim, idx)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    with dispatch.forced("cpu"):
        qsl.quant_gather_linear(x, qw.qweight, qw.scales, qw.offsets, None, 0.5, False, 4, 32)
    assert seen["rows"].numel() > 0 and bool((seen["rows"] >= 32).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_under_torch_compile(bits):
    qw, x, b = _case(bits, 2, True, True, seed=5)

    def f(x):
        return OP(x, qw.qweight, qw.scales, qw.offsets, b, 0.5, False, bits, qw.group_size, 0.5) * 2

    torch._dynamo.reset()
    out = torch.compile(f, backend="eager", fullgraph=True)(x)
    ref = 2 * quant_sparse_linear_reference(x, qw.qweight, qw.scales, qw.offsets, b, 0.5, False, bits, qw.group_size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
