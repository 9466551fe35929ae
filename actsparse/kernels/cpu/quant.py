"""The native CPU kernel for input-sparse linears over int8 / int4 weights (``actsparse.quantize``).

``quant_input_sparse.cpp`` reads the quantized row of each active input channel once and
dequantises it in registers (fp32 accumulation); inactive channels cost no weight bytes, and
an int4 group with no active channel costs no scale bytes either. Built on first use like the
float kernel (``actsparse.kernels.cpu``), as its own extension so that each builds alone;
``ACTSPARSE_CPU_KERNEL=0`` disables both. Where it cannot be built, ``load()`` returns None
(one warning) and the op uses the torch gather path.
"""

from __future__ import annotations

from typing import Any, Optional

from . import enabled
from ._extension import NativeExtension

_NATIVE = NativeExtension("actsparse_cpu_quant_input_sparse", "quant_input_sparse.cpp",
                          "the native CPU int8/int4 kernel", "quantized decode uses the gather path")


def load():
    """The compiled extension module, or None where it cannot be built or is disabled."""
    return _NATIVE.load() if enabled() else None


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
