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
import threading
import warnings
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def enabled() -> bool:
    return os.environ.get("ACTSPARSE_CPU_KERNEL", "1") not in ("0", "", "false", "no")


def load():
    """The compiled extension module, or None where it cannot be built or is disabled."""
    if not enabled():
        return None
    if "module" in _STATE:
        return _STATE["module"]
    with _LOCK:
        if "module" not in _STATE:
            _STATE["module"] = _build()
    return _STATE["module"]


def _build():
    from torch.utils.cpp_extension import load as load_extension

    src = Path(__file__).with_name("input_sparse.cpp")
    try:
        return load_extension(name="actsparse_cpu_input_sparse", sources=[str(src)],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, headers or ninja: the gather path still works
        warnings.warn(f"actsparse: the native CPU kernel could not be built ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); decode uses the slower gather path",
                      stacklevel=3)
        return None


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
