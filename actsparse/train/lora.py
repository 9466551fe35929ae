"""LoRA adapters as a weight parametrization: ``W + (alpha / r) B A`` on chosen linears.

A parametrization (not a wrapper module) keeps every module's name, class and forward, so it
composes with relufy's changes (dReLU's ReLU after up_proj, shifted ReLU's gate bias) and the
plan made before still names the right modules. ``merge_lora`` bakes the adapters into the
weights (what the backend compiles). Adapters are saved as safetensors with a JSON header
saying how to rebuild: the targets, rank, alpha and the relufy variant (and shifts).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

#: The linears of a Llama-style decoder block, by their last name component.
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_META_KEY = "actsparse"


class LoRA(nn.Module):
    """The parametrization ``W -> W + scale * B @ A``; B starts at zero, so the model is unchanged."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.scale = alpha / rank

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.B @ self.A)


def _check(rank: Any, alpha: Any, targets: Any) -> tuple[str, ...]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets \
            or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoRA targets must be a non-empty list of linear names (e.g. {', '.join(ALL_TARGETS)}), "
                         f"got {targets!r}")
    return tuple(targets)


def add_lora(model: nn.Module, targets: Sequence[str] = ALL_TARGETS, rank: int = 8, alpha: float = 16.0,
             seed: int = 0) -> list[str]:
    """Freeze ``model`` and put a LoRA adapter on each linear whose last name component is in
    ``targets``; returns the adapted module names."""
    targets = _check(rank, alpha, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not head and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"no linear of the model is named one of {list(targets)}")
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    for n in names:
        m = mods[n]
        if parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"{n} already has an adapter")
        w = m.weight
        parametrize.register_parametrization(
            m, "weight", LoRA(w.shape[0], w.shape[1], rank, alpha, gen, w.dtype, w.device))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRA]:
    """Adapted module name -> its LoRA parametrization."""
    found = {}
    for n, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, LoRA):
                    found[n] = p
    return found


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for lo in lora_modules(model).values() for p in (lo.A, lo.B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Bake the adapters into the weights (plain linears again, for compiling)."""
    adapted = set(lora_modules(model))
    for n, m in list(model.named_modules()):
        if n in adapted:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def save_adapters(model: nn.Module, path: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
    """The adapters as safetensors (``<module>.A``, ``<module>.B``), with how to rebuild in the header."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(mods.values()))
    meta = {"rank": first.A.shape[0], "alpha": first.scale * first.A.shape[0],
            "targets": sorted({n.rsplit(".", 1)[-1] for n in mods}), "modules": sorted(mods), **(info or {})}
    tensors = {f"{n}.{k}": getattr(lo, k).detach().contiguous().cpu() for n, lo in mods.items() for k in ("A", "B")}
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


def read_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header) of an adapter file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = (f.metadata() or {}).get(_META_KEY)
    if header is None:
        raise ValueError(f"{path} is not an actsparse adapter file (no '{_META_KEY}' header)")
    return load_file(str(path)), json.loads(header)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Put the file's adapters on ``model`` (already relufied as the header says); returns the header."""
    tensors, meta = read_adapters(path)
    names = add_lora(model, meta["targets"], int(meta["rank"]), float(meta["alpha"]))
    if sorted(names) != sorted(meta["modules"]):
        missing = sorted(set(meta["modules"]) ^ set(names))[:5]
        raise ValueError(f"adapter file does not fit the model: modules differ ({missing} ...)")
    mods = lora_modules(model)
    with torch.no_grad():
        for n, lo in mods.items():
            for k in ("A", "B"):
                t = tensors[f"{n}.{k}"]
                p = getattr(lo, k)
                if t.shape != p.shape:
                    raise ValueError(f"adapter {n}.{k} has shape {list(t.shape)}, the model wants {list(p.shape)}")
                p.copy_(t.to(p.dtype))
    return meta


def rebuild(model: nn.Module, path: str | os.PathLike, merge: bool = True):
    """A fine-tuned model from its base model and adapter file: relufy as the header records,
    then the adapters (merged into the weights unless ``merge=False``).

    Returns (model, plan): the relufied model's exact plan, or None where it was not relufied.
    """
    from .relufy import relufy

    _, meta = read_adapters(path)
    plan = None
    variant = meta.get("variant")
    if variant:
        kw = {"shift": meta["shifts"]} if meta.get("shifts") else {}
        model, plan = relufy(model, variant, **kw)
    load_adapters(model, path)
    return (merge_lora(model) if merge else model), plan
