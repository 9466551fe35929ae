"""``actsparse::quant_linear``: the dense linear over a quantized input-major weight.

What ``actsparse.quantize`` puts in a model: ``QuantLinear.forward`` calls it, so every
quantized linear is one recognisable node of the Dynamo graph (the passes find it as a site
and may replace it with ``quant_sparse_linear``). It is CompositeImplicitAutograd: Dynamo keeps
the call as one node, and AOTAutograd decomposes it into the dequantise-and-matmul below, which
Inductor compiles like any torch code. It runs wherever torch runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant.storage import dequantize_input_major

SCHEMA = ("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, Tensor? bias, "
          "int bits, int group_size) -> Tensor")

_LIB = torch.library.Library("actsparse", "FRAGMENT")


def quant_linear_dense(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Optional[Tensor], bias: Optional[Tensor],
                       bits: int, group_size: int) -> Tensor:
    """``x @ dequantize(W) + b`` with the weight dequantised in fp32, then cast to x's dtype."""
    w = dequantize_input_major(qweight, scales, offsets, bits, group_size).to(x.dtype)
    y = torch.matmul(x, w)
    return y if bias is None else y + bias.to(y.dtype)


_LIB.define(SCHEMA)
_LIB.impl("quant_linear", quant_linear_dense, "CompositeImplicitAutograd")
quant_linear = torch.ops.actsparse.quant_linear.default
