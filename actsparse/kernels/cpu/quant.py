"""The native CPU kernel for input-sparse linears over int8 / int4 weights (``actsparse.quantize``).

``quant_input_sparse.cpp`` reads the quantized row of each active input channel once and
dequantises it in registers (fp32 accumulation); inactive channels cost no weight bytes, and
an int4 group with no active channel costs no scale bytes either. Built on first use like the
float kernel (``actsparse.kernels.cpu``), as its own extension so that each builds alone;
``ACTSPARSE_CPU_KERNEL=0`` disables both. Where it cannot be built, ``load()`` returns None
(one warning) and the op uses the torch gather path.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any, Optional

from . import enabled

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def load():
    """The compiled extension module, or None where it cannot be built or is disabled."""
    if not enabled():
        return None
    if "module" not in _STATE:
        with _LOCK:
            if "module" not in _STATE:
                _STATE["module"] = _build()
    return _STATE["module"]


def _build():
    from torch.utils.cpp_extension import load as load_extension

    src = Path(__file__).with_name("quant_input_sparse.cpp")
    try:
        return load_extension(name="actsparse_cpu_quant_input_sparse", sources=[str(src)],
                              extra_cflags=["-O3", "-march=native", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, headers or ninja: the gather path still works
        warnings.warn(f"actsparse: the native CPU int8/int4 kernel could not be built ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); quantized decode uses the gather path",
                      stacklevel=3)
        return None


def quant_input_sparse_linear(x, qweight, scales, offsets, bias, threshold: float, bits: int, group_size: int,
                              row_scale: Optional[Any] = None, parts: int | None = None):
    """``linear(x * (|x| > t), dequantize(W), bias)`` for x [M, K], reading only active rows of
    the input-major ``qweight``; ``t`` is ``threshold``, times ``row_scale[m]`` per row where given.
    Returns None where the kernel is unavailable, so the caller can fall back."""
    import torch

    mod = load()
    if mod is None:
        return None
    if parts is None:
        parts = torch.get_num_threads()
    return mod.quant_input_sparse_linear(x, qweight, scales, offsets, bias, float(threshold), row_scale,
                                         int(bits), int(group_size), int(parts))
