"""Triton GPU kernels: input-sparse linear layers and the gated MLP (CATS or predicted mask).

Implementations only: which path runs (sparse kernel, masked dense matmul) is decided in
``actsparse.ops``. Triton is imported lazily by the kernel modules, so this package imports on
machines without it; ``is_available`` says whether the kernels can run here, ``runs_on``
whether they take a given input.
"""

from __future__ import annotations

import os

import torch

from ..limits import TRITON_MAX_ROWS


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests, no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available() -> bool:
    """Triton importable, and a CUDA device or the CPU interpreter to run it."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or interpreting()


def runs_on(x: torch.Tensor) -> bool:
    """Whether the sparse kernels take ``x`` [M, K]: 1..TRITON_MAX_ROWS rows on CUDA (or on the
    CPU under the interpreter)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= TRITON_MAX_ROWS:
        return False
    if x.device.type == "cuda":
        return is_available()
    return x.device.type == "cpu" and interpreting() and is_available()


__all__ = ["TRITON_MAX_ROWS", "interpreting", "is_available", "runs_on"]
