"""A native CPU kernel for the input-sparse linear layer at decode (few token rows).

PyTorch has no fused "gather rows and multiply" on the CPU: ``index_select`` followed by a
matmul writes the gathered rows and reads them again, which at SmolLM2's sizes costs more
than the dense matmul it replaces (``benchmarks/index_step_cpu.json``). The C++ kernel in
``input_sparse.cpp`` reads each active weight row once and nothing else. It is compiled on
first use with the same C++ toolchain Inductor needs on the CPU, and cached by PyTorch's
extension loader; if it cannot be built, ``load()`` returns None (with one warning) and the
op falls back to the gather path. ``ACTSPARSE_CPU_KERNEL=0`` disables it.
"""

from __future__ import annotations

import os

from ._extension import NativeExtension

_NATIVE = NativeExtension("actsparse_cpu_input_sparse", "input_sparse.cpp", "the native CPU kernel",
                          "decode uses the slower gather path")


def enabled() -> bool:
    return os.environ.get("ACTSPARSE_CPU_KERNEL", "1") not in ("0", "", "false", "no")


def load():
    """The compiled extension module, or None where it cannot be built or is disabled."""
    return _NATIVE.load() if enabled() else None


def input_sparse_linear(x, wt, threshold: float, channel_thresholds=None, parts: int | None = None):
    """``(x * (|x| > tau)) @ wt`` reading only active rows of ``wt`` ([K, N], contiguous).

    ``tau`` is ``threshold`` or, if given, ``channel_thresholds`` (one per input channel).
    Returns None where the kernel is unavailable, so the caller can fall back.
    """
    import torch

    mod = load()
    if mod is None:
        return None
    if parts is None:
        parts = torch.get_num_threads()
    return mod.input_sparse_linear(x, wt, float(threshold), channel_thresholds, int(parts))


def output_sparse_linear(x, w, idx):
    """``F.linear(x, w[idx])`` reading the rows ``idx`` of the row-major ``w`` ([N, K],
    contiguous) in place, with no gathered copy (a gated MLP's up projection on its active
    neurons). Returns None where the kernel is unavailable."""
    mod = load()
    if mod is None or not hasattr(mod, "output_sparse_linear"):
        return None
    return mod.output_sparse_linear(x, w, idx)
