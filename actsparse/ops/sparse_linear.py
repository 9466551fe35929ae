"""``actsparse::sparse_linear``: linears that share one input x, each on ``x * (|x| > t_i)``.

TEAL masks (``per_token=False``: a fixed threshold per linear) and statistical top-k
(``per_token=True``: ``t_i * mean|x|`` per token row). One call serves q/k/v or gate/up, so
the input is read and masked once. Input-sparse weights: ``weights`` (stored input-major).

Dispatch, per call (see ``actsparse.ops.dispatch``):

* CUDA, few rows, the cost model in favour: the Triton split-K kernel (one launch);
* CPU, few rows: the native kernel reads only the active weight rows of an input-major
  weight; where it cannot be built, the gather path copies those rows and multiplies them;
* otherwise (prefill, or a union of masks that is nearly dense): the masked dense form.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import cpu as native
from .dense import masked_linears
from .dispatch import choose
from .limits import CPU_GATHER_MAX_DENSITY
from .reference import input_mask, row_scale, sparse_linear_reference
from .spec import define_op


def gather_rows(w: Tensor, idx: Tensor) -> Tensor:
    """Rows of W^T for the channels in ``idx``, as a [len(idx), N] matrix (contiguous row copies
    when W is stored input-major)."""
    return w.t().index_select(0, idx)


def cpu_linear(x2: Tensor, w: Tensor, b: Optional[Tensor], threshold, per_token: bool) -> Tensor:
    """The CPU paths for a few rows: the native kernel, else the gather path, else dense."""
    if x2.dtype == w.dtype and w.t().is_contiguous() and native.load() is not None:
        if per_token:  # one cutoff per row: one call per row
            scale = row_scale(x2)
            y = torch.cat([native.input_sparse_linear(x2[i:i + 1], w.t(), float(threshold) * float(scale[i]))
                           for i in range(x2.shape[0])])
        elif isinstance(threshold, Tensor):
            y = native.input_sparse_linear(x2, w.t(), 0.0, threshold.to(x2.device, torch.float32))
        else:
            y = native.input_sparse_linear(x2, w.t(), float(threshold))
        return y if b is None else y + b
    mask = input_mask(x2, threshold, per_token)
    active = mask.any(0)
    if int(active.sum()) <= CPU_GATHER_MAX_DENSITY * x2.shape[1]:
        idx = active.nonzero().squeeze(1)
        xs = torch.where(mask[:, idx], x2[:, idx], torch.zeros((), dtype=x2.dtype))
        y = xs @ gather_rows(w, idx)
        return y if b is None else y + b
    return F.linear(torch.where(mask, x2, torch.zeros((), dtype=x2.dtype)), w, b)


def run_masked_linears(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list,
                       per_token: bool, sparsity_hint: float) -> list[Tensor]:
    """The dispatch shared by ``sparse_linear`` and ``channel_sparse_linear`` (thresholds may be
    per-channel cutoff vectors)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    ns = [int(w.shape[0]) for w in weights]
    outs = run_on_path(choose(x2, k, ns, sparsity_hint, weights[0].element_size()), x2, weights, biases,
                       thresholds, per_token, sparsity_hint)
    return [o.reshape(*lead, o.shape[-1]) for o in outs]


def run_on_path(chosen: tuple, x2: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list,
                per_token: bool, sparsity_hint: float) -> list[Tensor]:
    """The masked linears of 2-D ``x2`` on a path ``dispatch.choose`` already picked (callers that
    must know the path before running, as the gated product, choose once)."""
    path, tri = chosen
    if path == "triton":
        channel = [t if isinstance(t, Tensor) else None for t in thresholds]
        scalars = [1.0 if isinstance(t, Tensor) else float(t) for t in thresholds]
        outs = tri.launch_sparse_linear(
            x2.contiguous(), list(weights), list(biases), scalars,
            row_scale(x2) if per_token else None, sparsity_hint,
            channel_thresholds=channel if any(c is not None for c in channel) else None)
    elif path == "cpu":
        outs = [cpu_linear(x2, w, b, t, per_token) for w, b, t in zip(weights, biases, thresholds)]
    else:
        outs = masked_linears(x2, weights, biases, thresholds, per_token)
    return outs


def _sparse_linear(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], thresholds: list[float],
                   per_token: bool, sparsity_hint: float) -> list[Tensor]:
    """Linears sharing one input, each on ``x * (|x| > t_i)`` (per_token: ``t_i * mean|x|``)."""
    return run_masked_linears(x, list(weights), list(biases), list(thresholds), per_token, sparsity_hint)


def _fake(x, weights, biases, thresholds, per_token, sparsity_hint):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


def _reference(x, weights, biases, thresholds, per_token, sparsity_hint):
    return sparse_linear_reference(x, weights, biases, thresholds, per_token)


def reserve_sparse_gemv(device: torch.device, k: int, ns: list[int]) -> None:
    """The split-K workspace of the Triton kernel, sized at compile time (outside CUDA-graph pools)."""
    from .dispatch import triton_module

    if device.type != "cuda":
        return
    sg = triton_module("sparse_gemv")
    if sg is not None:
        sg.reserve_buffers(device, k, ns)


def _reserve(args) -> None:
    ws = args["weights"]
    if ws and all(isinstance(w, Tensor) for w in ws):
        reserve_sparse_gemv(ws[0].device, ws[0].shape[1], [w.shape[0] for w in ws])


SPEC = define_op("sparse_linear", _sparse_linear, _fake, reference=_reference,
                 input_sparse=("weights",), reserve=_reserve)
sparse_linear = SPEC.op
