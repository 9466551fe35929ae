"""``QuantLinear``: an nn.Linear whose weight is kept quantized, input-major.

It subclasses nn.Linear so that code that looks for linears (hook references, calibration
statistics, fingerprints) finds it; ``weight`` is a read-only property that dequantises on
access (WINA's column norms, the eager reference), and ``weight_shape`` gives the shape without
dequantising. The forward is one ``actsparse::quant_linear`` call: dense, pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .storage import QuantizedWeight, dequantize_input_major


class QuantLinear(nn.Linear):
    """A linear layer over quantized input-major storage (see ``actsparse.quant.storage``)."""

    def __init__(self, qw: QuantizedWeight, bias: Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight is allocated
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.bits, self.group_size = qw.bits, qw.group_size
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("offsets", qw.offsets)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None, clip: str = "minmax",
                    importance: Tensor | None = None) -> "QuantLinear":
        from .storage import quantize_weight

        return cls(quantize_weight(linear.weight, bits, group_size, clip, importance), linear.bias)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The dequantised weight [out, in] in the scales' dtype (computed on every access)."""
        return dequantize_input_major(self.qweight, self.scales, self.offsets, self.bits,
                                      self.group_size).t().to(self.scales.dtype)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.actsparse.quant_linear.default(x, self.qweight, self.scales, self.offsets, self.bias,
                                                        self.bits, self.group_size)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"bits={self.bits}{g}"
