"""``actsparse::quant_sparse_linear``: ``linear(x * (|x| > t), dequantize(W), b)`` over a
quantized input-major weight (``actsparse.quantize``'s int8, grouped int8 or int4 storage).

What ``insert_masks`` puts in place of an ``actsparse::quant_linear`` that a plan masks (TEAL
thresholds, or statistical top-k with ``per_token``). The weight is already stored input-major
in its quantized form, so no argument is declared input-sparse (nothing to re-store).

Dispatch, per call (``actsparse.ops.dispatch``):

* CUDA, few rows, the cost model in favour: the Triton kernel (``kernels/triton/quant_gemv``);
* CPU, few rows: the native kernel (``kernels/cpu/quant``) reads each active channel's
  quantized row once and dequantises it in registers; where it cannot be built, the gather
  path, in torch, copies the active channels' quantized rows only, dequantises and multiplies;
* otherwise (prefill): the masked input, then the dense dequantise-and-matmul.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.cpu import quant as native
from ..quant.storage import unpack_int4
from .dense import masked_input
from .dispatch import choose, triton_module
from .quant_linear import quant_linear_dense
from .reference import input_mask, quant_sparse_linear_reference, row_scale
from .spec import define_op


NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quant_gather_linear(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Optional[Tensor],
                        bias: Optional[Tensor], threshold: float, per_token: bool, bits: int,
                        group_size: int) -> Tensor:
    """The CPU path for a few rows: only the quantized rows of active channels are read."""
    mask = input_mask(x2, threshold, per_token)
    idx = mask.any(0).nonzero().squeeze(1)
    xs = torch.where(mask[:, idx], x2[:, idx], torch.zeros((), dtype=x2.dtype)).float()
    rows = qweight.index_select(0, idx)  # [active, N] int8 or [active, N / 2] packed int4
    if bits == 8 and not group_size:
        y = (xs @ rows.float()) * scales.float()
    elif bits == 8:  # grouped int8: each active channel's row times its group's scales
        y = xs @ (rows.float() * scales.float()[idx // group_size])
    else:
        g = idx // group_size
        y = xs @ (unpack_int4(rows).float() * scales.float()[g] + offsets.float()[g])
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


def quant_cpu_linear(x2: Tensor, qweight: Tensor, scales: Tensor, offsets: Optional[Tensor],
                     bias: Optional[Tensor], threshold: float, per_token: bool, bits: int, group_size: int) -> Tensor:
    """The CPU paths for a few rows: the native kernel, else the gather path."""
    if x2.dtype in NATIVE_DTYPES and qweight.is_contiguous():
        y = native.quant_input_sparse_linear(x2, qweight, scales, offsets, bias, threshold, bits, group_size,
                                             row_scale(x2) if per_token else None)
        if y is not None:
            return y
    return quant_gather_linear(x2, qweight, scales, offsets, bias, threshold, per_token, bits, group_size)


def _quant_sparse_linear(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Optional[Tensor],
                         bias: Optional[Tensor], threshold: float, per_token: bool, bits: int, group_size: int,
                         sparsity_hint: float) -> Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = qweight.shape[1] * (2 if bits == 4 else 1)
    path, _ = choose(x2, k, [n], sparsity_hint, 1)
    kernel = triton_module("quant_gemv") if path == "triton" else None
    if kernel is not None:
        y = kernel.launch_quant_sparse_linear(x2.contiguous(), qweight, scales, offsets, bias, threshold, bits,
                                              group_size, row_scale=row_scale(x2) if per_token else None,
                                              sparsity_hint=sparsity_hint)
    elif path == "cpu":
        y = quant_cpu_linear(x2, qweight, scales, offsets, bias, threshold, per_token, bits, group_size)
    else:
        y = quant_linear_dense(masked_input(x2, threshold, per_token), qweight, scales, offsets, bias, bits,
                               group_size)
    return y.reshape(*lead, n)


def reserve_quant_gemv(device: torch.device, n: int, k: int) -> None:
    """The Triton kernel's split-K workspace and list scratch, sized at compile time (outside
    CUDA-graph pools)."""
    if device.type != "cuda":
        return
    kernel = triton_module("quant_gemv")
    if kernel is not None:
        kernel.reserve_buffers(device, n, k=k)


def _reserve(args) -> None:
    x, q = args["x"], args["qweight"]
    if isinstance(x, Tensor) and isinstance(q, Tensor):
        reserve_quant_gemv(x.device, q.shape[1] * (2 if args["bits"] == 4 else 1), int(x.shape[-1]))


def _fake(x, qweight, scales, offsets, bias, threshold, per_token, bits, group_size, sparsity_hint):
    return x.new_empty(*x.shape[:-1], qweight.shape[1] * (2 if bits == 4 else 1))


def _reference(x, qweight, scales, offsets, bias, threshold, per_token, bits, group_size, sparsity_hint):
    return quant_sparse_linear_reference(x, qweight, scales, offsets, bias, threshold, per_token, bits, group_size)


SPEC = define_op("quant_sparse_linear", _quant_sparse_linear, _fake, reference=_reference, reserve=_reserve)
quant_sparse_linear = SPEC.op
