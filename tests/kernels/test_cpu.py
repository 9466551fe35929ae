"""The native CPU input-sparse kernel against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.compiler.layout import to_input_major
import actsparse.ops  # noqa: F401  (registers the ops)
from actsparse.kernels import cpu
from actsparse.ops.limits import CPU_SPARSE_MAX_ROWS
from actsparse.ops.reference import sparse_linear_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

pytestmark = pytest.mark.skipif(cpu.load() is None, reason="native CPU kernel could not be built")


def _close(got, ref, dtype):
    scale = ref.float().abs().max().item() + 1e-6
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * scale + TOL[dtype], f"err {err} scale {scale}"


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 70), n=st.integers(1, 40), dtype=st.sampled_from(list(TOL)),
       t=st.sampled_from([0.0, 0.2, 0.7, 1.5, 1e9]), per_channel=st.booleans(), parts=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_kernel_matches_reference(rows, k, n, dtype, t, per_channel, parts, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    if per_channel:
        tau = torch.rand(k, generator=gen) * 1.5
        got = cpu.input_sparse_linear(x, w.t().contiguous(), 0.0, tau, parts=parts)
        ref = F.linear(torch.where(x.abs().float() > tau, x, torch.zeros((), dtype=dtype)).float(), w.float())
    else:
        got = cpu.input_sparse_linear(x, w.t().contiguous(), t, parts=parts)
        ref = sparse_linear_reference(x, [w], [None], [t])[0]
    assert got.dtype == dtype and got.shape == (rows, n)
    _close(got, ref, dtype)


def test_kernel_rejects_bad_input():
    with pytest.raises(RuntimeError, match="channels"):
        cpu.input_sparse_linear(torch.randn(1, 5), torch.randn(4, 3), 0.1)
    with pytest.raises(RuntimeError, match="one value per input channel"):
        cpu.input_sparse_linear(torch.randn(1, 4), torch.randn(4, 3), 0.1, torch.rand(3))


def _input_major(n, k):
    w = torch.nn.Parameter(torch.randn(n, k), requires_grad=False)
    to_input_major(w)
    return w.data


def test_op_uses_kernel_for_decode_rows(monkeypatch):
    calls = []
    real = cpu.input_sparse_linear
    monkeypatch.setattr(cpu, "input_sparse_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    w = _input_major(32, 64)
    x = torch.randn(1, 64)
    got = torch.ops.actsparse.sparse_linear(x, [w], [None], [0.5], False, 0.5)[0]
    torch.testing.assert_close(got, sparse_linear_reference(x, [w], [None], [0.5])[0])
    assert calls == [(1, 64)]
    torch.ops.actsparse.sparse_linear(torch.randn(CPU_SPARSE_MAX_ROWS + 1, 64), [w], [None], [0.5], False, 0.5)
    assert len(calls) == 1  # prefill rows: masked dense, not the kernel


def test_disabled_kernel_falls_back_to_gather(monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CPU_KERNEL", "0")
    assert cpu.load() is None
    w = _input_major(16, 40)
    x = torch.randn(2, 40)
    got = torch.ops.actsparse.sparse_linear(x, [w], [None], [0.4], True, 0.5)[0]
    torch.testing.assert_close(got, sparse_linear_reference(x, [w], [None], [0.4], per_token=True)[0])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 70), n=st.integers(1, 40), dtype=st.sampled_from(list(TOL)),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_output_sparse_kernel_matches_reference(rows, k, n, dtype, density, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    idx = (torch.rand(n, generator=gen) < density).nonzero().squeeze(1)
    got = cpu.output_sparse_linear(x, w, idx)
    assert got.dtype == dtype and got.shape == (rows, idx.numel())
    if idx.numel():
        _close(got, F.linear(x.float(), w.float()[idx]), dtype)


def test_output_sparse_kernel_rejects_bad_input():
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.output_sparse_linear(torch.randn(1, 4), torch.randn(3, 4), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="columns"):
        cpu.output_sparse_linear(torch.randn(1, 5), torch.randn(3, 4), torch.tensor([0]))
