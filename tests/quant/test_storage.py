"""Quantized input-major storage: int4 packing round trip, error bounds, layout, option checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.quant.storage import (check_options, concat_outputs, dequantize_input_major, pack_int4,
                                     quantize_weight, unpack_int4)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@SETTINGS
@given(k=st.integers(1, 40), half=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(k, half, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, 2 * half), generator=g, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (k, half) and packed.is_contiguous()
    assert torch.equal(unpack_int4(packed), q)


def test_pack_layout_is_half_split():
    q = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)  # outputs 0..3 of one input channel
    assert pack_int4(q).tolist() == [[1 | (3 << 4), 2 | (4 << 4)]]


def test_pack_rejects_odd_outputs():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(6, 5), (70, 100), (1, 33)])
def test_int8_error_bound_and_layout(n, k, dtype):
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) / 3).to(dtype)
    qw = quantize_weight(w, 8)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (k, n) and qw.qweight.is_contiguous()
    assert qw.scales.shape == (n,) and qw.scales.dtype == dtype and qw.offsets is None
    assert int(qw.qweight.abs().max()) <= 127
    err = (qw.dequantize() - w.float()).abs()
    step = qw.scales.float()[:, None]  # one step per output channel
    assert bool((err <= 0.5 * step * (1 + 1e-3) + 1e-7).all()), float((err / step).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n", [2, 46, 128])
def test_int4_error_bound_and_layout(n, group, dtype):
    k = 2 * group
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(n + group)) / 3).to(dtype)
    qw = quantize_weight(w, 4, group)
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (k, n // 2) and qw.qweight.is_contiguous()
    assert qw.scales.shape == (k // group, n) and qw.offsets.shape == (k // group, n)
    deq = dequantize_input_major(qw.qweight, qw.scales, qw.offsets, 4, group)  # [K, N]
    err = (deq - w.float().t()).abs()
    step = qw.scales.float().repeat_interleave(group, 0)
    # half a step, plus what rounding the scale and offset to the storage dtype can add
    slack = 0 if dtype == torch.float32 else 2.0**-7 * (w.float().abs().max())
    assert bool((err <= 0.5 * step * (1 + 1e-3) + 1e-6 + slack).all()), float((err / step).max())
    # int4 costs about 16x the int8 error, far below the weights' own scale
    assert float(err.max()) < 0.1 * float(w.float().abs().max())


def test_int4_exact_on_representable_weights():
    """Weights already on a 16-level grid per group come back exactly."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 8), generator=g).float()  # [K, N]
    q[0], q[1] = 0, 15  # every output's group spans the full range
    w = (q * 0.25 - 1.0).t().contiguous()  # [N, K]
    qw = quantize_weight(w, 4, 64)
    assert torch.equal(qw.dequantize(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64])
def test_grouped_int8_error_bound_and_layout(group, dtype):
    n, k = 70, 3 * group
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(group)) / 3).to(dtype)
    w[:, :group] *= 0.01  # a group of small weights gets its own, finer, scale
    qw = quantize_weight(w, 8, group)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (k, n) and qw.qweight.is_contiguous()
    assert qw.scales.shape == (k // group, n) and qw.offsets is None and qw.group_size == group
    err = (qw.dequantize() - w.float()).abs().t()  # [K, N]
    step = qw.scales.float().repeat_interleave(group, 0)
    assert bool((err <= 0.5 * step * (1 + 1e-3) + 1e-7).all()), float((err / step).max())
    assert float(qw.scales.float()[0].max()) < 0.05 * float(qw.scales.float()[1].min())


def test_grouped_int8_is_per_channel_int8_with_one_group():
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(1))
    a, b = quantize_weight(w, 8), quantize_weight(w, 8, 128)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales[0])


def test_constant_and_zero_weights():
    for bits, gs in ((8, None), (8, 32), (4, 32)):
        w = torch.zeros(4, 32)
        w[1] = 0.5
        qw = quantize_weight(w, bits, gs)
        assert torch.equal(qw.dequantize(), w)


@pytest.mark.parametrize("bits,gs,msg", [(3, None, "bits must be"), (8, 48, "group_size must be"),
                                          (4, 48, "group_size must be"), (True, None, "bits must be")])
def test_options_rejected(bits, gs, msg):
    with pytest.raises(ValueError, match=msg):
        check_options(bits, gs)


def test_int4_shape_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_weight(torch.randn(4, 40), 4, 32)
    with pytest.raises(ValueError, match="even number"):
        quantize_weight(torch.randn(3, 32), 4, 32)


def _weighted_err(w, qw, imp):
    """Importance-weighted squared error per (group, output) of an int4 weight [N, K]."""
    n, k = w.shape
    g = qw.group_size
    diff = (qw.dequantize() - w).t().reshape(k // g, g, n)
    return (imp.reshape(k // g, g, 1) * diff ** 2).sum(1)


@SETTINGS
@given(groups=st.integers(1, 3), half=st.integers(1, 8), outlier=st.floats(1.0, 20.0), weighted=st.booleans(),
       seed=st.integers(0, 2**16))
def test_int4_mse_clip_never_worse_than_minmax(groups, half, outlier, weighted, seed):
    """The fitted range has at most the full range's (weighted) error in every group and output:
    the full range is one of the candidates."""
    g = torch.Generator().manual_seed(seed)
    k, n = 32 * groups, 2 * half
    w = torch.randn(n, k, generator=g)
    w[0, 0] *= outlier  # one wide value stretches its group's range
    imp = torch.rand(k, generator=g) * 4 if weighted else torch.ones(k)
    full = quantize_weight(w, 4, 32)
    fit = quantize_weight(w, 4, 32, clip="mse", importance=imp if weighted else None)
    assert torch.all(_weighted_err(w, fit, imp) <= _weighted_err(w, full, imp) * (1 + 1e-5) + 1e-9)


def test_int4_mse_clip_follows_the_importance():
    """A channel of zero importance may be clipped freely: the range fits the others better;
    with uniform importance the outlier keeps the full range."""
    w = torch.linspace(-1, 1, 32).repeat(2, 1)
    w[:, 0] = -8.0  # far outside the rest
    imp = torch.ones(32)
    imp[0] = 0.0
    fit = quantize_weight(w, 4, 32, clip="mse", importance=imp)
    full = quantize_weight(w, 4, 32)
    err = lambda q: float(((q.dequantize() - w)[:, 1:] ** 2).sum())  # noqa: E731
    assert err(fit) < 0.75 * err(full)
    assert torch.equal(quantize_weight(w, 4, 32, clip="mse").qweight, full.qweight)


def test_clip_options_rejected():
    with pytest.raises(ValueError, match="clip must be one of"):
        quantize_weight(torch.randn(4, 32), 4, 32, clip="percentile")
    with pytest.raises(ValueError, match="one value per input channel"):
        quantize_weight(torch.randn(4, 32), 4, 32, clip="mse", importance=torch.ones(31))


@pytest.mark.parametrize("bits,gs", [(8, None), (8, 32), (4, 32)])
def test_concat_outputs_is_the_weights_side_by_side(bits, gs):
    g = torch.Generator().manual_seed(5)
    parts = [quantize_weight(torch.randn(n, 64, generator=g), bits, gs) for n in (6, 10, 4)]
    joined = concat_outputs(parts)
    assert joined.out_features == 20 and joined.in_features == 64 and joined.bits == bits
    torch.testing.assert_close(joined.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_concat_outputs_refuses_mixed_formats():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="formats differ"):
        concat_outputs([quantize_weight(w, 8), quantize_weight(w, 8, 32)])
