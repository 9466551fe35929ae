"""``actsparse::held_quant_sparse_linear``: ``quant_sparse_linear`` over a weight the backend holds.

torchao's quantized linears (``actsparse.quant.torchao_weights``) reach the graph as one tensor
subclass placeholder, not as our input-major buffers. The pass converts the parameter once
(cached on it) and registers the storage as backend constants (``actsparse.ops.constants``:
kept exactly as long as the compiled graph, at fixed addresses for CUDA graphs); this op gets
the key and runs ``quant_sparse_linear``'s dispatch on it. ``out_features`` is in the schema so
the fake never reads the constants.

Grad mode: the input's gradient is ``mask * (dy @ W)`` with the mask held fixed, computed by
the opaque ``held_quant_grad_input`` (the weight is read when it runs, never while tracing).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import constants
from .quant_sparse_linear import _quant_sparse_linear, reserve_quant_gemv
from .reference import input_mask, quant_sparse_linear_reference
from .spec import OPS, OpSpec


def storage(key: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(qweight, scales, offsets or None) registered under ``key``."""
    held = constants.lookup(key)
    return held[0], held[1], held[2] if len(held) > 2 else None


@torch.library.custom_op("actsparse::held_quant_sparse_linear", mutates_args=())
def held_quant_sparse_linear(x: Tensor, key: str, bias: Optional[Tensor], threshold: float, per_token: bool,
                             bits: int, group_size: int, out_features: int, sparsity_hint: float) -> Tensor:
    q, s, o = storage(key)
    return _quant_sparse_linear(x, q, s, o, bias, threshold, per_token, bits, group_size, sparsity_hint)


@held_quant_sparse_linear.register_fake
def _fake(x, key, bias, threshold, per_token, bits, group_size, out_features, sparsity_hint):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("actsparse::held_quant_grad_input", mutates_args=())
def held_quant_grad_input(grad: Tensor, key: str, bits: int, group_size: int, in_features: int) -> Tensor:
    """``grad @ W`` [..., K] for the held weight W [N, K] (dequantised in fp32)."""
    from ..quant.storage import dequantize_input_major

    q, s, o = storage(key)
    w = dequantize_input_major(q, s, o, bits, group_size)  # [K, N]
    return (grad.float() @ w.t()).to(grad.dtype)


@held_quant_grad_input.register_fake
def _grad_fake(grad, key, bits, group_size, in_features):
    return grad.new_empty(*grad.shape[:-1], in_features)


def _setup(ctx, inputs, output):
    x, key, bias, threshold, per_token, bits, group_size, _, _ = inputs
    ctx.args = (key, threshold, per_token, bits, group_size, bias is not None)
    ctx.save_for_backward(x)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    key, threshold, per_token, bits, group_size, has_bias = ctx.args
    k = x.shape[-1]
    keep = input_mask(x.reshape(-1, k), threshold, per_token).reshape(x.shape)
    gx = held_quant_grad_input(grad, key, bits, group_size, k)
    gx = torch.where(keep, gx, torch.zeros((), dtype=gx.dtype, device=gx.device))
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None
    return gx, None, gb, None, None, None, None, None, None


held_quant_sparse_linear.register_autograd(_backward, setup_context=_setup)


def _reserve(args) -> None:
    if isinstance(args["x"], Tensor):
        reserve_quant_gemv(args["x"].device, int(args["out_features"]), int(args["x"].shape[-1]))


OPS[held_quant_sparse_linear._opoverload] = OpSpec(name="held_quant_sparse_linear",
                                                   op=held_quant_sparse_linear._opoverload, reserve=_reserve)
held_quant_sparse_linear_op = held_quant_sparse_linear._opoverload


def held_quant_sparse_linear_reference(x: Tensor, key: str, bias: Optional[Tensor], threshold: float,
                                       per_token: bool, bits: int, group_size: int, out_features: int,
                                       sparsity_hint: float) -> Tensor:
    """The op in pure torch: the held weight dequantised, the input masked, one matmul."""
    q, s, o = storage(key)
    return quant_sparse_linear_reference(x, q, s, o, bias, threshold, per_token, bits, group_size)

