"""Quantized weights stored input-major, so that a skipped input channel costs no weight bytes.

A linear ``y = x W^T`` with W [N, K] (N outputs, K input channels) is stored as its transpose:
row k holds input channel k's N quantized values, contiguous. A decode step whose input is
zero on channel k never reads row k.

* int8 (``bits=8``): ``qweight`` int8 [K, N], symmetric, one scale per output channel
  (``scales`` [N]): ``W[n, k] ~ qweight[k, n] * scales[n]``. The scale does not depend on k,
  so a kernel applies it once to each output's sum.
* grouped int8 (``bits=8, group_size=G``): symmetric, one scale per (group of G input
  channels, output): ``W[n, k] ~ qweight[k, n] * scales[k // G, n]``, ``scales``
  [K / G, N]. GGUF's Q8_0 and Q5_0 (G = 32), its Q6_K (G = 16, the one width outside
  ``GROUP_SIZES``: read from files, not offered by ``quantize``) and torchao's per-group int8
  are this layout; a kernel sums each active group's channels and applies the group's scales
  once per group.
* int4 (``bits=4``): asymmetric, one scale and one offset per (group of ``group_size`` input
  channels, output): ``W[n, k] ~ q[k, n] * scales[g, n] + offsets[g, n]``, q in 0..15,
  g = k // group_size, ``scales`` and ``offsets`` [K / group_size, N]. Two values per byte,
  packed along the outputs so that each input channel's row stays contiguous: ``qweight``
  uint8 [K, N / 2], byte j of row k holds output j in its low nibble and output j + N / 2 in
  its high nibble ("half-split": unpacking is two shifts and a concatenation, no interleave).

Scales and offsets keep the original weight's dtype; values are rounded against the stored
(rounded) scales so the dequantised weight is within half a step of the original.

int4's range per (group, output) is the group's min..max (``clip="minmax"``) or, with
``clip="mse"``, that range shrunk by the factor of ``SHRINKS`` with the least squared error
over the group, each input channel's error weighted by ``importance`` (the mean square of its
activations, where known). Four bits cannot afford a range stretched by one outlier, and the
channels that carry large activations are the ones a sparse model keeps, so their error weighs
most.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
CLIPS = ("minmax", "mse")
#: Range factors ``clip="mse"`` tries for each int4 group.
SHRINKS = tuple(1.0 - 0.05 * i for i in range(9))


@dataclass
class QuantizedWeight:
    """One linear's quantized weight (see the module docstring for the layout)."""

    qweight: Tensor
    scales: Tensor
    offsets: Tensor | None
    bits: int
    group_size: int  # input channels per scale; 0 for int8 with one scale per output
    out_features: int
    in_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as nn.Linear holds it, [N, K], computed in fp32 then cast to ``dtype``."""
        return dequantize_input_major(self.qweight, self.scales, self.offsets, self.bits,
                                      self.group_size).t().to(dtype)


def check_options(bits: int, group_size: int | None) -> None:
    """Raise ValueError on a bit width or group size this storage does not have."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or group_size not in GROUP_SIZES):
        raise ValueError(f"group_size must be one of {GROUP_SIZES} (input channels per scale; int8 also "
                         f"takes None: one scale per output channel), got {group_size!r}")


def pack_int4(q: Tensor) -> Tensor:
    """[K, N] integers in 0..15 (N even) -> uint8 [K, N / 2], half-split (see module docstring)."""
    k, n = q.shape
    if n % 2:
        raise ValueError(f"int4 packing needs an even number of outputs, got {n}")
    q = q.to(torch.uint8)
    return (q[:, : n // 2] | (q[:, n // 2:] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [K, N / 2] -> uint8 [K, N] in 0..15: the inverse of ``pack_int4``."""
    return torch.cat([packed & 0xF, packed >> 4], dim=1)


def int8_scales(wg: Tensor, dtype: torch.dtype) -> Tensor:
    """Symmetric int8 scales [groups, N] of ``wg`` [groups, G, N]: each (group, output)'s
    largest magnitude maps to 127 (1 where the group is all zeros)."""
    amax = wg.abs().amax(dim=1)
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(dtype)


def quantize_int8(w: Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric int8 from an nn.Linear weight [N, K]: one scale per output channel, or per
    (group of ``group_size`` input channels, output)."""
    n, k = w.shape
    if group_size and k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    g = group_size or k
    wg = w.detach().float().t().reshape(k // g, g, n)  # [groups, G, N], input-major
    scales = int8_scales(wg, w.dtype)  # [groups, N]
    q = torch.round(wg / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8).reshape(k, n)
    scales = scales if group_size else scales[0]
    return QuantizedWeight(q.contiguous(), scales.contiguous(), None, 8, group_size or 0, n, k)


def int4_range(wg: Tensor, lo: Tensor, hi: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(codes [groups, G, N], scales, offsets in ``dtype``) for the range lo..hi per (group, output)."""
    span = hi - lo
    scales = torch.where(span > 0, span / 15, torch.ones_like(span)).to(dtype)
    offsets = lo.to(dtype)
    q = torch.round((wg - offsets.float()[:, None]) / scales.float()[:, None]).clamp_(0, 15)
    return q, scales, offsets


def mse_range(wg: Tensor, lo: Tensor, hi: Tensor, importance: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The range ``lo..hi`` of each (group, output) of ``wg`` [groups, G, N] shrunk by the factor
    of ``SHRINKS`` with the least squared error, each input channel's error weighted by
    ``importance`` [groups, G, 1]."""
    best = factor = None
    for f in SHRINKS:
        q, sc, off = int4_range(wg, lo * f, hi * f, dtype)
        err = (importance * (q * sc.float()[:, None] + off.float()[:, None] - wg) ** 2).sum(dim=1)  # [groups, N]
        if best is None:
            best, factor = err, torch.full_like(err, f)
        else:
            better = err < best
            best, factor = torch.where(better, err, best), torch.where(better, f, factor)
    return lo * factor, hi * factor


def quantize_int4(w: Tensor, group_size: int, clip: str = "minmax", importance: Tensor | None = None) -> QuantizedWeight:
    """Asymmetric int4, one (scale, offset) per group of input channels and output channel;
    ``clip`` and ``importance`` [K] as in the module docstring."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    if n % 2:
        raise ValueError(f"int4 needs an even number of outputs (two per byte), got {n}")
    wg = w.detach().float().t().reshape(k // group_size, group_size, n)  # [groups, G, N], input-major
    lo, hi = wg.amin(dim=1), wg.amax(dim=1)
    if clip == "mse":
        imp = torch.ones(k) if importance is None else importance.detach().float().reshape(-1).cpu()
        lo, hi = mse_range(wg, lo, hi, imp.to(wg.device).reshape(k // group_size, group_size, 1), w.dtype)
    q, scales, offsets = int4_range(wg, lo, hi, w.dtype)
    packed = pack_int4(q.reshape(k, n))
    return QuantizedWeight(packed, scales.contiguous(), offsets.contiguous(), 4, group_size, n, k)


def quantize_weight(w: Tensor, bits: int, group_size: int | None = None, clip: str = "minmax",
                    importance: Tensor | None = None) -> QuantizedWeight:
    """Quantize an nn.Linear weight [N, K] to the input-major storage (``clip``, ``importance``:
    int4 only, see the module docstring)."""
    check_options(bits, group_size)
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {tuple(w.shape)}")
    if importance is not None and importance.numel() != w.shape[1]:
        raise ValueError(f"importance needs one value per input channel ({w.shape[1]}), got {importance.numel()}")
    if bits == 8:
        return quantize_int8(w, group_size)
    return quantize_int4(w, group_size or GROUP_SIZES[-1], clip, importance)


def concat_outputs(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """The weights of several linears on one input as one weight with their outputs side by side
    (q/k/v, gate/up): one call reads them all. They must share bits, group size and input width."""
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size, first.in_features):
            raise ValueError(f"concat_outputs: formats differ: int{p.bits} g{p.group_size} k={p.in_features} "
                             f"against int{first.bits} g{first.group_size} k={first.in_features}")
    if first.bits == 4:  # half-split packing: repack the joined rows
        qweight = pack_int4(torch.cat([unpack_int4(p.qweight) for p in parts], dim=1))
    else:
        qweight = torch.cat([p.qweight for p in parts], dim=1).contiguous()
    axis = 0 if first.scales.dim() == 1 else 1
    scales = torch.cat([p.scales for p in parts], dim=axis).contiguous()
    offsets = None if first.offsets is None else torch.cat([p.offsets for p in parts], dim=1).contiguous()
    return QuantizedWeight(qweight, scales, offsets, first.bits, first.group_size,
                           sum(p.out_features for p in parts), first.in_features)


def dequantize_input_major(qweight: Tensor, scales: Tensor, offsets: Tensor | None, bits: int,
                           group_size: int) -> Tensor:
    """The dequantised weight in fp32, input-major [K, N] (``x @ result`` is the linear)."""
    if bits == 8 and not group_size:
        return qweight.float() * scales.float()[None, :]
    if bits == 8:
        k, n = qweight.shape
        return (qweight.float().reshape(k // group_size, group_size, n) * scales.float()[:, None]).reshape(k, n)
    q = unpack_int4(qweight).float()
    k, n = q.shape
    g = q.reshape(k // group_size, group_size, n)
    return (g * scales.float()[:, None] + offsets.float()[:, None]).reshape(k, n)
