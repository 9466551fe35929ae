"""Triton GPU kernels for input-sparse linear layers (TEAL-style masks) and the CATS gated MLP.

Public entry points (plain functions on CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):

- `sparse_linear(x, weights, biases, thresholds, row_scale=None, sparsity_hint=None)`
- `gated_mlp_cats(x, w_gate, w_up, w_down, act, act_threshold, sparsity_hint=None)`
- `is_available()`

They pick the sparse kernel or a dense `F.linear` on the masked input from the batch size and
the cost model (known at compile time: no data-dependent branch, no host synchronisation).
Triton is imported lazily, so this package imports on machines without it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

MAX_ROWS = 16


def is_available() -> bool:
    """Triton importable, and a CUDA device or the CPU interpreter to run it."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel_ok(x: torch.Tensor) -> bool:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sparse_linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    thresholds: Sequence[float],
    row_scale: Optional[torch.Tensor] = None,
    sparsity_hint: Optional[float] = None,
    channel_thresholds: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> list[torch.Tensor]:
    """y_i = (x * (|x| > thresholds[i] * row_scale)) @ weights[i]^T + biases[i], one launch.

    `channel_thresholds` (optional, one entry per output, each None or a 1-D fp32 tensor of K
    per-channel thresholds) replaces the scalar threshold of that output: the cutoff of
    x[m, k] is then channel_thresholds[i][k] * row_scale[m].

    x [M, K] (M <= 16 for the kernel; more rows go dense), weights 1..3 tensors [N_i, K] of
    any strides (fast: input-major, strides (1, N_i)), fp32 accumulation, outputs in x's dtype.
    `sparsity_hint` (calibrated sparsity) keys the autotuning and the dense/sparse choice.
    """
    from actsparse.kernels import cost_model
    from actsparse.kernels.triton import sparse_gemv

    if _kernel_ok(x) and sparse_gemv.batch_path_enabled(x.shape[0]):
        k = x.shape[1]
        n = sum(int(w.shape[0]) for w in weights)
        dense_better = sparsity_hint is not None and not cost_model.prefer_sparse(
            x.shape[0], k, n, float(sparsity_hint), weights[0].element_size(), against="fallback")
        if not dense_better:
            return sparse_gemv.launch_sparse_linear(x, weights, biases, thresholds, row_scale, sparsity_hint,
                                                    channel_thresholds=channel_thresholds)
    return sparse_gemv.dense_sparse_linear(x, weights, biases, thresholds, row_scale, channel_thresholds)


def gated_mlp_cats(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: str,
    act_threshold: float,
    sparsity_hint: Optional[float] = None,
) -> torch.Tensor:
    """CATS MLP: h = act(x Wg^T) * (x Wu^T) where |act(x Wg^T)| > act_threshold, out = h Wd^T.

    Fast layouts: w_up row-major, w_down input-major (strides (1, K_out)); any strides work.
    """
    from actsparse.kernels import cost_model
    from actsparse.kernels.triton import gated_mlp, sparse_gemv

    m = x.shape[0] if x.dim() == 2 else 0
    if _kernel_ok(x) and sparse_gemv.batch_path_enabled(m) and (m == 1 or gated_mlp.DOT_PATH_ENABLED):
        dense_better = sparsity_hint is not None and cost_model.gated_mlp_predict(
            x.shape[0], x.shape[1], w_gate.shape[0], float(sparsity_hint), w_gate.element_size())["speedup"] <= 1.0
        if not dense_better:
            return gated_mlp.launch_gated_mlp_cats(x, w_gate, w_up, w_down, act, act_threshold, sparsity_hint)
    return gated_mlp.dense_gated_mlp_cats(x, w_gate, w_up, w_down, act, act_threshold)


def sparse_linear_reference(*args, **kwargs):
    from actsparse.kernels.triton.sparse_gemv import sparse_linear_reference as ref

    return ref(*args, **kwargs)


def gated_mlp_cats_reference(*args, **kwargs):
    from actsparse.kernels.triton.gated_mlp import gated_mlp_cats_reference as ref

    return ref(*args, **kwargs)


__all__ = ["is_available", "sparse_linear", "gated_mlp_cats", "sparse_linear_reference",
           "gated_mlp_cats_reference", "MAX_ROWS"]
