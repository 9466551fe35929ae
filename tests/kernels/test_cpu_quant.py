"""The native CPU int8 / int4 input-sparse kernel against the pure-torch reference, at odd shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actsparse.ops  # noqa: F401  (registers the ops)
import actsparse.ops.quant_sparse_linear as qsl
from actsparse.kernels.cpu import quant
from actsparse.ops import dispatch
from actsparse.ops.reference import quant_sparse_linear_reference, row_scale
from actsparse.quant.storage import quantize_int8, quantize_weight

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

pytestmark = pytest.mark.skipif(quant.load() is None, reason="native CPU quantized kernel could not be built")


def _close(got, ref, dtype):
    scale = ref.float().abs().max().item() + 1e-6
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * scale + TOL[dtype], f"err {err} scale {scale}"


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([8, 4, "8g"]), rows=st.integers(1, 5), groups=st.integers(1, 5), n_half=st.integers(1, 37),
       group=st.sampled_from([16, 32, 64]), dtype=st.sampled_from(list(TOL)), t=st.sampled_from([0.0, 0.3, 0.9, 1e9]),
       per_token=st.booleans(), bias=st.booleans(), parts=st.integers(1, 5), wdtype=st.sampled_from(
           [torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_kernel_matches_reference(bits, rows, groups, n_half, group, dtype, t, per_token, bias, parts, wdtype, seed):
    gen = torch.Generator().manual_seed(seed)
    grouped = bits != 8  # "8g": int8 with one scale per group (GGUF Q8_0's layout)
    bits = 8 if bits == "8g" else bits
    group = 32 if bits == 4 and group == 16 else group  # 16-channel groups exist for int8 only (GGUF Q6_K)
    n = 2 * n_half + (1 if bits == 8 and seed % 2 else 0)  # odd outputs where the format allows (int8)
    k = groups * group if grouped else groups * 13 + seed % 7  # odd input widths for per-channel int8
    w = (torch.randn(n, k, generator=gen) / 4).to(wdtype)
    if group == 16 and grouped:  # GGUF Q6_K's layout: quantize_weight does not offer it
        qw = quantize_int8(w, 16)
    else:
        qw = quantize_weight(w, bits, group if grouped else None)
    x = torch.randn(rows, k, generator=gen)
    x[:, : k // 3] *= 0.1  # some channels (int4: whole groups) mostly inactive
    x = x.to(dtype)
    b = (torch.randn(n, generator=gen) / 10).to(wdtype) if bias else None
    got = quant.quant_input_sparse_linear(x, qw.qweight, qw.scales, qw.offsets, b, t, bits, qw.group_size,
                                          row_scale(x) if per_token else None, parts=parts)
    ref = quant_sparse_linear_reference(x, qw.qweight, qw.scales, qw.offsets, b, t, per_token, bits, qw.group_size)
    assert got.dtype == dtype and got.shape == (rows, n)
    _close(got, ref, dtype)


def test_kernel_rejects_bad_input():
    qw = quantize_weight(torch.randn(6, 64), 4, 32)
    with pytest.raises(RuntimeError, match="channels"):
        quant.quant_input_sparse_linear(torch.randn(1, 63), qw.qweight, qw.scales, qw.offsets, None, 0.1, 4, 32)
    with pytest.raises(RuntimeError, match="offsets"):
        quant.quant_input_sparse_linear(torch.randn(1, 64), qw.qweight, qw.scales, None, None, 0.1, 4, 32)
    with pytest.raises(RuntimeError, match="bits"):
        quant.quant_input_sparse_linear(torch.randn(1, 64), qw.qweight, qw.scales, qw.offsets, None, 0.1, 3, 32)
    g8 = quantize_weight(torch.randn(6, 64), 8, 32)
    with pytest.raises(RuntimeError, match="K / group_size, N"):
        quant.quant_input_sparse_linear(torch.randn(1, 64), g8.qweight, g8.scales[:1], None, None, 0.1, 8, 32)
    q8 = quantize_weight(torch.randn(6, 64), 8)
    with pytest.raises(RuntimeError, match="one scale per output"):
        quant.quant_input_sparse_linear(torch.randn(1, 64), q8.qweight, q8.scales[:3], None, None, 0.1, 8, 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_op_uses_kernel_for_decode_rows(bits, monkeypatch):
    qw = quantize_weight(torch.randn(40, 64), bits, 32 if bits == 4 else None)
    x = torch.randn(1, 1, 64)
    calls = []
    real = quant.quant_input_sparse_linear
    monkeypatch.setattr(quant, "quant_input_sparse_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = torch.ops.actsparse.quant_sparse_linear.default(x, qw.qweight, qw.scales, qw.offsets, None, 0.5, False,
                                                          bits, qw.group_size, 0.5)
    assert calls, "the CPU decode path did not call the native kernel"
    ref = quant_sparse_linear_reference(x, qw.qweight, qw.scales, qw.offsets, None, 0.5, False, bits, qw.group_size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_op_falls_back_to_gather_without_kernel(monkeypatch):
    qw = quantize_weight(torch.randn(40, 64), 8)
    x = torch.randn(2, 64)
    monkeypatch.setattr(quant, "load", lambda: None)
    with dispatch.forced("cpu"):
        out = qsl.quant_cpu_linear(x, qw.qweight, qw.scales, None, None, 0.5, True, 8, 0)
    ref = quant_sparse_linear_reference(x, qw.qweight, qw.scales, None, None, 0.5, True, 8, 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
