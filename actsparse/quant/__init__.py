"""Weight quantization whose storage the sparse kernels read: ``actsparse.quantize``.

    model = actsparse.quantize(model, bits=8)                  # int8, per output channel
    model = actsparse.quantize(model, bits=4, group_size=64)   # int4, groups along the input
    model = actsparse.quantize(model, bits=8, group_size=32)   # int8, groups along the input (GGUF Q8_0's layout)
    model = actsparse.quantize(model, bits=4, clip="mse", tokens=ids)  # int4 ranges fitted, weighted by activations

Every nn.Linear except the output head (the decoder's linears, the ones a plan can mask)
becomes a ``QuantLinear``; embeddings and the LM head keep their dtype. The quantized model
runs everywhere (its forward is a dense dequantise-and-matmul), calibrates like the original,
and takes plans made on the original (same fingerprint). Compiled with ``backend="sparse"``
and a plan, its masked linears run the quantized sparse kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import QuantLinear
from .storage import (BITS, CLIPS, GROUP_SIZES, QuantizedWeight, check_options, dequantize_input_major,
                      quantize_weight)

__all__ = ["BITS", "CLIPS", "GROUP_SIZES", "QuantLinear", "QuantizedWeight", "dequantize_input_major", "quantize",
           "quantize_weight", "quantizable_linears"]


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears ``quantize`` replaces: every plain nn.Linear but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and m is not head}


def _group_size(linears: dict[str, nn.Linear], group_size: int | None) -> int | None:
    """The int4 group size: the one asked for (every layer's input must divide into it), or
    the largest of GROUP_SIZES that divides every layer's input width."""
    widths = {n: m.in_features for n, m in linears.items()}
    if group_size is not None:
        bad = [f"{n} ({k})" for n, k in widths.items() if k % group_size]
        if bad:
            raise ValueError(f"group_size={group_size} does not divide the input width of "
                             f"{len(bad)} linears: {', '.join(bad[:4])}; pick a divisor from {GROUP_SIZES}")
        return group_size
    for g in reversed(GROUP_SIZES):
        if all(k % g == 0 for k in widths.values()):
            return g
    bad = [f"{n} ({k})" for n, k in widths.items() if k % GROUP_SIZES[0]]
    raise ValueError(f"int4 needs input widths that are multiples of {GROUP_SIZES[0]}: {', '.join(bad[:4])}")


def activation_importance(model: nn.Module, linears: dict[str, nn.Linear], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean square of each linear's input channels over ``tokens`` (one forward pass)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def pre(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def quantize(model: nn.Module, bits: int = 8, group_size: int | None = None, *, clip: str = "minmax",
             tokens: torch.Tensor | None = None) -> nn.Module:
    """Replace the model's linears (not the output head) by quantized ones, in place.

    ``bits``: 8 (symmetric int8, one scale per output channel, or with ``group_size`` one per
    group of input channels and output) or 4 (asymmetric int4, one scale and offset per
    ``group_size`` input channels and output; ``group_size`` one of GROUP_SIZES, default the
    largest that divides every layer's input width). ``clip`` (int4): ``"minmax"`` (each
    group's full range) or ``"mse"`` (the range with the least squared error, weighted per
    input channel by its activations' mean square over ``tokens`` [batch, seq] when given).
    Returns the model.
    """
    check_options(bits, group_size)
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    if tokens is not None and (clip != "mse" or bits != 4):
        raise ValueError("tokens= weights int4's clip search: it takes bits=4 and clip='mse'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    linears = quantizable_linears(model)
    if not linears:
        raise ValueError("the model has no nn.Linear to quantize (besides its output head)")
    importance = activation_importance(model, linears, tokens) if tokens is not None else {}
    if bits == 4 or group_size is not None:
        group_size = _group_size(linears, group_size)
        odd = [f"{n} ({m.out_features})" for n, m in linears.items() if m.out_features % 2]
        if odd:
            raise ValueError(f"int4 stores two outputs per byte; odd output widths: {', '.join(odd[:4])}")
    for name, lin in linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(lin, bits, group_size, clip, importance.get(name)))
    return model
