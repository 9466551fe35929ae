"""What a plan records of its model, so that a plan used on another model fails loudly.

The fingerprint is the architecture name and the shape of every linear-like weight. It is
deliberately blind to values and dtypes: a plan made on the bf16 model applies to its fp32,
re-stored or quantized (``actsparse.quantize``) copy, but not to a model of other widths, depth or architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .checks import PlanError, expect_int, expect_list, expect_mapping, expect_str, short_list


def is_linear_like(mod: torch.nn.Module) -> bool:
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def linear_weights(model: torch.nn.Module) -> dict[str, list[int]]:
    """Module name -> weight shape for every linear-like layer (nn.Linear, HF Conv1D)."""
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "weight_shape", None), tuple) and is_linear_like(mod):
            shapes[name] = list(mod.weight_shape)  # quantized (actsparse.quantize): the float weight's shape
            continue
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and is_linear_like(mod):
            shapes[name] = list(w.shape)
    return shapes


def fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a plan needs to recognise its model: architecture and linear weight shapes."""
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) if cfg is not None else None
    arch = archs[0] if archs else type(model).__name__
    return {"architecture": arch, "weights": linear_weights(model)}


def parse_fingerprint(value: Any, field: str = "model") -> dict[str, Any] | None:
    """A fingerprint read from a plan file, checked field by field (None: no model recorded)."""
    if value is None:
        return None
    d = expect_mapping(value, field)
    arch = expect_str(d.get("architecture"), f"{field}.architecture")
    weights = {}
    for name, shape in expect_mapping(d.get("weights", {}), f"{field}.weights").items():
        dims = expect_list(shape, f"{field}.weights[{name!r}]")
        weights[name] = [expect_int(x, f"{field}.weights[{name!r}]", low=0) for x in dims]
    return {"architecture": arch, "weights": weights}


def check_fingerprint(mine: Mapping[str, Any] | None, other: Mapping[str, Any]) -> None:
    """Raise PlanError if ``other`` (a model's fingerprint) is not the model ``mine`` describes."""
    if mine is None:
        return
    if mine.get("architecture") != other.get("architecture"):
        raise PlanError(f"plan was made for a {mine.get('architecture')} model, not for "
                        f"{other.get('architecture')}")
    a, b = mine.get("weights", {}), other.get("weights", {})
    # both ways: a model with more layers (another depth) is another model too
    diff = [f"{n}: plan {a.get(n)} vs model {b.get(n)}" for n in sorted(set(a) | set(b))
            if list(a.get(n) or []) != list(b.get(n) or [])]
    if diff:
        raise PlanError("plan was made for another model (weight shapes differ): " + short_list(diff))


def check_weight_shapes(mine: Mapping[str, Any] | None, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Like check_fingerprint, for the weights one traced graph holds (a partial view)."""
    if mine is None:
        return
    a = mine.get("weights", {})
    diff = [f"{n}: plan {a[n]} vs model {list(s)}" for n, s in shapes.items()
            if n in a and list(a[n]) != list(s)]
    if diff:
        raise PlanError("plan was made for another model (weight shapes differ): " + short_list(diff))
