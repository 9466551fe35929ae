"""Weight quantization whose storage the sparse kernels read: ``actsparse.quantize``.

    model = actsparse.quantize(model, bits=8)                  # int8, per output channel
    model = actsparse.quantize(model, bits=4, group_size=64)   # int4, groups along the input
    model = actsparse.quantize(model, bits=8, group_size=32)   # int8, groups along the input (GGUF Q8_0's layout)
    model = actsparse.quantize(model, bits=4, clip="mse", tokens=ids)  # int4 ranges fitted, weighted by activations
    model = actsparse.quantize(model, bits=4, rounding="gptq-act", tokens=ids)  # GPTQ, act order
    model = actsparse.quantize(model, bits=8, rounding="gptq", tokens=ids, plan=plan)  # GPTQ fitted to the sparse model
    save_quantized(model, "m.quant.safetensors"); load_quantized(fresh_model, "m.quant.safetensors")  # made once

Every nn.Linear except the output head (the decoder's linears, the ones a plan can mask)
becomes a ``QuantLinear``; embeddings and the LM head keep their dtype. The quantized model
runs everywhere (its forward is a dense dequantise-and-matmul), calibrates like the original,
and takes plans made on the original (same fingerprint). Compiled with ``backend="sparse"``
and a plan, its masked linears run the quantized sparse kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from .files import load_quantized, save_quantized
from .linear import QuantLinear
from .storage import (BITS, CLIPS, GROUP_SIZES, QuantizedWeight, check_options, dequantize_input_major,
                      quantize_weight)

#: ``rounding=`` choices: each weight to its nearest code, or GPTQ's error feedback (``gptq.py``)
#: with the channels in order or ("gptq-act") those with the largest inputs first.
ROUNDINGS = ("nearest", "gptq", "gptq-act")

__all__ = ["BITS", "CLIPS", "GROUP_SIZES", "ROUNDINGS", "QuantLinear", "QuantizedWeight", "dequantize_input_major", "quantize",
           "quantize_weight", "quantizable_linears", "save_quantized", "load_quantized"]


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
             tokens: torch.Tensor | None = None, rounding: str = "nearest", plan=None,
             hessian_memory_gb: float | None = 4.0, progress: bool = False) -> nn.Module:
    """Replace the model's linears (not the output head) by quantized ones, in place.

    ``bits``: 8 (symmetric int8, one scale per output channel, or with ``group_size`` one per
    group of input channels and output) or 4 (asymmetric int4, one scale and offset per
    ``group_size`` input channels and output; ``group_size`` one of GROUP_SIZES, default the
    largest that divides every layer's input width). ``clip`` (int4): ``"minmax"`` (each
    group's full range) or ``"mse"`` (the range with the least squared error, weighted per
    input channel by its activations' mean square over ``tokens`` [batch, seq] when given).
    ``rounding``: ``"nearest"``, ``"gptq"`` (each linear's output error over ``tokens``
    minimised, see ``actsparse.quant.gptq``; needs ``tokens``) or ``"gptq-act"`` (the same,
    channels with the largest inputs rounded first: GPTQ's act order); with ``plan`` (a
    ``SparsityPlan`` of this model), GPTQ minimises the error of the sparse model under that plan.
    The storage, and so the kernels, are the same whichever rounding. ``hessian_memory_gb``
    (GPTQ): at most that many GB of input Hessians live at once (one forward pass per chunk of
    linears; None: all at once, a single pass); the result is the same either way.
    ``progress``: a progress bar over the linears. Returns the model.
    """
    check_options(bits, group_size)
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding != "nearest" and tokens is None:
        raise ValueError(f"rounding={rounding!r} needs tokens= (calibration token ids [batch, seq]): its error is "
                         "measured on the inputs they produce")
    if rounding == "nearest" and tokens is not None and (clip != "mse" or bits != 4):
        raise ValueError("tokens= weights int4's clip search (bits=4, clip='mse') or feeds rounding='gptq'")
    if plan is not None and rounding == "nearest":
        raise ValueError("plan= tunes GPTQ's rounding to the sparse model: it takes rounding='gptq' or 'gptq-act'")
    if plan is not None and not hasattr(plan, "thresholds"):
        raise TypeError(f"plan must be an actsparse.SparsityPlan, got {type(plan).__name__}")
    if hessian_memory_gb is not None and (isinstance(hessian_memory_gb, bool) or not (
            isinstance(hessian_memory_gb, (int, float)) and hessian_memory_gb > 0)):
        raise ValueError(f"hessian_memory_gb must be a positive number of GB or None, got {hessian_memory_gb!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    linears = quantizable_linears(model)
    if not linears:
        raise ValueError("the model has no nn.Linear to quantize (besides its output head)")
    if bits == 4 or group_size is not None:
        group_size = _group_size(linears, group_size)
        odd = [f"{n} ({m.out_features})" for n, m in linears.items() if m.out_features % 2]
        if odd:
            raise ValueError(f"int4 stores two outputs per byte; odd output widths: {', '.join(odd[:4])}")
    from tqdm.auto import tqdm

    def replace(name: str, layer: QuantLinear) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)

    if rounding != "nearest":
        from .gptq import gptq_linears

        limit = None if hessian_memory_gb is None else int(hessian_memory_gb * 2 ** 30)
        fitted = gptq_linears(model, linears, tokens, bits, group_size, clip, rounding == "gptq-act", plan,
                              max_hessian_bytes=limit, progress=progress)
        for name, qw in fitted.items():  # replaced only now: every Hessian came from the unquantized model
            replace(name, QuantLinear(qw, linears[name].bias))
        return model
    importance = activation_importance(model, linears, tokens) if tokens is not None else {}
    for name, lin in tqdm(linears.items(), total=len(linears), desc=f"quantize int{bits}", disable=not progress,
                          leave=False):
        replace(name, QuantLinear.from_linear(lin, bits, group_size, clip, importance.get(name)))
    return model
