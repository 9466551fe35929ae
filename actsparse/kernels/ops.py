"""The ``torch.library`` custom ops that the backend's passes insert into the graph.

Each op has a fake implementation (Inductor and CUDA graphs need output shapes without running
it) and a real one that picks its path at run time:

* few token rows (decode) on the CPU: the native kernel (``actsparse.kernels.cpu``) reads only
  the weight rows of the active input channels (``GATHER_MAX_ROWS``); where it cannot be built,
  gather those rows and multiply only them (``GATHER_MAX_DENSITY``);
* few token rows on a CUDA device: the Triton sparse kernels (``actsparse.kernels.triton``);
* many token rows (prefill), or a mask that is nearly dense: apply the mask and run the dense
  matmul on the same weight storage.

All paths compute the function defined in ``actsparse.kernels.reference``.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu as _cpu
from .reference import activation, input_mask

#: Token rows up to which the CPU op skips inactive weight rows instead of running dense.
#: Above it (prefill) the union of the rows' masks is nearly dense and one GEMM is cheaper.
GATHER_MAX_ROWS = 4

#: Fraction of active input channels (union over the rows) above which the CPU op runs dense:
#: gathering nearly every row copies as many bytes as the dense matmul reads, so it only loses.
GATHER_MAX_DENSITY = 0.85

#: Token rows up to which CUDA tensors go to the Triton sparse kernels (their batch buckets).
TRITON_MAX_ROWS = 16


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _triton():
    """The Triton kernel module, or None where it cannot run (no triton, no CUDA)."""
    try:
        mod = importlib.import_module("actsparse.kernels.triton")
    except Exception:  # pragma: no cover - triton missing or broken
        return None
    available = getattr(mod, "is_available", None)
    return mod if available is not None and available() else None


def _gather_rows(w: Tensor, idx: Tensor) -> Tensor:
    """Rows of W^T for the channels in ``idx``, as a [len(idx), N] matrix.

    Cheap (contiguous row copies) when W is stored input-major, ``W.t().contiguous().t()``,
    which the backend arranges for the weights of masked sites.
    """
    return w.t().index_select(0, idx)


def _native_cpu(x2: Tensor, w: Tensor):
    """The native CPU kernel module if it applies to (x2, w), else None."""
    if x2.shape[0] > GATHER_MAX_ROWS or x2.dtype != w.dtype or x2.is_cuda or not w.t().is_contiguous():
        return None
    return _cpu if _cpu.load() is not None else None


def _linear_cpu(x2: Tensor, w: Tensor, b: Optional[Tensor], mask: Tensor) -> Tensor:
    """The gather path: copy the active weight rows, multiply only those."""
    rows = x2.shape[0]
    if rows <= GATHER_MAX_ROWS:
        active = mask.any(0)
        n_active = int(active.sum())
        if n_active <= GATHER_MAX_DENSITY * x2.shape[1]:
            idx = active.nonzero().squeeze(1)
            xs = torch.where(mask[:, idx], x2[:, idx], _zero(x2))
            y = xs @ _gather_rows(w, idx)
            return y if b is None else y + b
    return F.linear(torch.where(mask, x2, _zero(x2)), w, b)


def _sparse_cpu(x2: Tensor, w: Tensor, b: Optional[Tensor], t: float, per_token: bool,
                channel_t: Optional[Tensor] = None) -> Optional[Tensor]:
    """Native kernel for few rows over an input-major weight; None where it does not apply."""
    native = _native_cpu(x2, w)
    if native is None:
        return None
    if per_token:  # one cutoff per row: one call per row
        scale = _row_scale(x2)
        y = torch.cat([native.input_sparse_linear(x2[i:i + 1], w.t(), t * float(scale[i]))
                       for i in range(x2.shape[0])])
    else:
        y = native.input_sparse_linear(x2, w.t(), t, channel_t)
    return y if b is None else y + b


# The ops are ``torch.library.custom_op``s: Inductor and CUDA graphs handle them as opaque
# calls with the fake implementations' output shapes. (Declared with the lower-level
# ``torch.library.Library`` API a call from a compiled CPU graph is cheaper, about 6 us
# against 30, but Inductor's CUDA-graph partitioning then crashed on the GPU.)

def _sparse_linear(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Optional[Tensor]],
    thresholds: list[float],
    per_token: bool,
    sparsity_hint: float,
) -> list[Tensor]:
    """Linears sharing one input, each on ``x * (|x| > t_i)`` (per_token: ``t_i * mean|x|``)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    tri = _triton() if x.is_cuda and 0 < rows <= TRITON_MAX_ROWS else None
    if tri is not None:
        outs = tri.sparse_linear(
            x2.contiguous(), list(weights), list(biases), list(thresholds),
            row_scale=None if not per_token else _row_scale(x2), sparsity_hint=sparsity_hint,
        )
    else:
        outs, masks = [], {}
        for w, b, t in zip(weights, biases, thresholds):
            y = _sparse_cpu(x2, w, b, t, per_token) if not x.is_cuda else None
            if y is not None:
                outs.append(y)
                continue
            if t not in masks:
                masks[t] = input_mask(x2, t, per_token)
            if x.is_cuda:
                outs.append(F.linear(torch.where(masks[t], x2, _zero(x2)), w, b))
            else:
                outs.append(_linear_cpu(x2, w, b, masks[t]))
    return [o.reshape(*lead, o.shape[-1]) for o in outs]


def _sparse_linear_fake(x, weights, biases, thresholds, per_token, sparsity_hint):
    lead = x.shape[:-1]
    return [x.new_empty(*lead, w.shape[0]) for w in weights]


#: Per-channel cutoff vectors of compiled WINA sites, by id (graph constants would need to
#: be graph inputs or module attributes, which Dynamo graphs do not take after tracing).
CHANNEL_CUTOFFS: dict[int, Tensor] = {}


def register_channel_cutoffs(cutoffs: Tensor) -> int:
    """Keep a per-channel cutoff vector for ``channel_sparse_linear``; returns its id."""
    key = len(CHANNEL_CUTOFFS)
    CHANNEL_CUTOFFS[key] = cutoffs
    return key


def _channel_sparse_linear(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Optional[Tensor]],
    cutoff_ids: list[int],
    sparsity_hint: float,
) -> list[Tensor]:
    """Linears sharing one input, each on ``x * (|x| > tau_i)`` with one cutoff per channel.

    WINA plans reach here: masking ``|x_k| * ||W[:, k]|| > t`` is ``|x_k| > t / ||W[:, k]||``;
    ``cutoff_ids`` name the vectors in ``CHANNEL_CUTOFFS``. Few rows: the native CPU kernel or
    the Triton kernel skip inactive rows; many rows: the mask is applied and the matmul runs dense.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    taus = []
    for key in cutoff_ids:
        if CHANNEL_CUTOFFS[key].device != x.device:
            CHANNEL_CUTOFFS[key] = CHANNEL_CUTOFFS[key].to(x.device)
        taus.append(CHANNEL_CUTOFFS[key])
    tri = _triton() if x.is_cuda and 0 < x2.shape[0] <= TRITON_MAX_ROWS else None
    if tri is not None:
        outs = tri.sparse_linear(x2.contiguous(), list(weights), list(biases), [1.0] * len(taus),
                                 sparsity_hint=sparsity_hint, channel_thresholds=taus)
        return [o.reshape(*lead, o.shape[-1]) for o in outs]
    outs = []
    for w, b, tau in zip(weights, biases, taus):
        y = _sparse_cpu(x2, w, b, 0.0, False, tau) if not x.is_cuda else None
        if y is None:
            mask = x2.abs().float() > tau
            y = F.linear(torch.where(mask, x2, _zero(x2)), w, b)
        outs.append(y.reshape(*lead, y.shape[-1]))
    return outs


def _channel_sparse_linear_fake(x, weights, biases, cutoff_ids, sparsity_hint):
    lead = x.shape[:-1]
    return [x.new_empty(*lead, w.shape[0]) for w in weights]


def _row_scale(x2: Tensor) -> Tensor:
    return x2.float().abs().mean(dim=-1)


def _gated_mlp(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor],
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    act: str,
    threshold: float,
    per_token: bool,
    sparsity_hint: float,
) -> Tensor:
    """CATS gated MLP: gate dense, mask ``|act(gate)| > t``, up and down only where active."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    no_bias = b_gate is None and b_up is None and b_down is None
    tri = _triton() if x.is_cuda and no_bias and not per_token and 0 < rows <= TRITON_MAX_ROWS else None
    if tri is not None:
        out = tri.gated_mlp_cats(x2.contiguous(), w_gate, w_up, w_down, act, threshold,
                                 sparsity_hint=sparsity_hint)
        return out.reshape(*lead, out.shape[-1])
    g = activation(act, F.linear(x2, w_gate, b_gate))
    mask = input_mask(g, threshold, per_token)
    if not x.is_cuda and rows <= GATHER_MAX_ROWS:
        active = mask.any(0)
        n_active = int(active.sum())
        if n_active <= GATHER_MAX_DENSITY * g.shape[1]:
            idx = active.nonzero().squeeze(1)
            up = F.linear(x2, w_up.index_select(0, idx), None if b_up is None else b_up[idx])
            h = torch.where(mask[:, idx], g[:, idx] * up, _zero(g))
            out = h @ _gather_rows(w_down, idx)
            out = out if b_down is None else out + b_down
            return out.reshape(*lead, out.shape[-1])
    h = torch.where(mask, g * F.linear(x2, w_up, b_up), _zero(g))
    out = F.linear(h, w_down, b_down)
    return out.reshape(*lead, out.shape[-1])


def _gated_mlp_fake(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, threshold, per_token, sparsity_hint):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


def _register(name: str, impl, fake):
    op = torch.library.custom_op(f"actsparse::{name}", mutates_args=())(impl)
    op.register_fake(fake)
    return op


_register("sparse_linear", _sparse_linear, _sparse_linear_fake)
_register("channel_sparse_linear", _channel_sparse_linear, _channel_sparse_linear_fake)
_register("gated_mlp", _gated_mlp, _gated_mlp_fake)

#: ``actsparse::sparse_linear``: TEAL masks (or per-token statistical cutoffs), shared input.
sparse_linear = torch.ops.actsparse.sparse_linear.default
#: ``actsparse::channel_sparse_linear``: one cutoff per input channel (WINA), shared input.
channel_sparse_linear = torch.ops.actsparse.channel_sparse_linear.default
#: ``actsparse::gated_mlp``: CATS, the activation mask skips up rows and down columns.
gated_mlp = torch.ops.actsparse.gated_mlp.default
