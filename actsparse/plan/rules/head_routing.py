"""Head routing (Polar Sparsity): per token, a router picks the attention heads that run.

Keyed by an attention block's output projection (o_proj). Per token, a linear router on the
block's input (the input of q_proj) scores the block's *units* and the ``keep`` best run; the
heads of every other unit output exactly zero, so their K/V cache rows are never read while
decoding and o_proj's input is zero on whole heads. A unit is ``heads_per_unit`` consecutive
query heads: a whole KV group (the default where there are several KV heads: only whole
groups save KV bytes) or a single query head (saves compute and o_proj columns only, the one
choice with a single KV head). The K/V cache is still written for every head.

The router's weights are the tensors ``"<o_proj>.w"`` [units, d] and ``"<o_proj>.b"`` [units].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import PlanError, expect_int, expect_mapping, expect_str
from .base import PerModuleRule, register_rule

SPEC_KEYS = ("q_proj", "num_heads", "num_kv_heads", "head_dim", "heads_per_unit", "units", "keep", "in_features")


def check_spec(name: str, spec: Any) -> dict[str, Any]:
    where = f"heads[{name!r}]"
    spec = dict(expect_mapping(spec, where))
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise PlanError(f"{where} lacks {', '.join(missing)}")
    expect_str(spec["q_proj"], f"{where}['q_proj']")
    for k in SPEC_KEYS[1:]:
        expect_int(spec[k], f"{where}[{k!r}]", low=1)
    hq, hkv, hpu = spec["num_heads"], spec["num_kv_heads"], spec["heads_per_unit"]
    if hq % hkv:
        raise PlanError(f"{where}: num_heads {hq} is not a multiple of num_kv_heads {hkv}")
    g = hq // hkv
    if g % hpu and hpu % g:
        raise PlanError(f"{where}: heads_per_unit {hpu} must divide the group size {g} or be a multiple of it")
    if spec["units"] * hpu != hq:
        raise PlanError(f"{where}: units {spec['units']} x heads_per_unit {hpu} != num_heads {hq}")
    if spec["keep"] > spec["units"]:
        raise PlanError(f"{where}: keep {spec['keep']} exceeds {spec['units']} units")
    return spec


@register_rule
@dataclass
class HeadRouting(PerModuleRule):
    kind = "heads"
    fields = ("heads",)
    has_tensors = True

    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    tensor_label = "head router tensors"
    tensor_owner = "head router"

    def __post_init__(self) -> None:
        self.specs = {n: check_spec(n, s) for n, s in expect_mapping(self.specs, "heads").items()}
        self.weights = self.typed_tensors(self.weights)

    def input_major_modules(self, linears: list[str]) -> set[str]:
        return set(self.specs)  # o_proj: its input is zero on whole unselected heads

    def density(self, name: str) -> float:
        sp = self.specs[name]
        return sp["keep"] / sp["units"]

    def tensor_shapes(self, name: str, spec: dict[str, Any]) -> dict[str, list[int]]:
        return {f"{name}.w": [spec["units"], spec["in_features"]], f"{name}.b": [spec["units"]]}

    def check(self, shapes: Mapping[str, list[int]]) -> None:
        self.check_tensors()
        for name, sp in self.specs.items():
            width = sp["num_heads"] * sp["head_dim"]
            if list(shapes.get(name, []))[1:] != [width]:
                raise PlanError(f"head router for {name!r} was made for {sp['num_heads']} heads of "
                                f"{sp['head_dim']}; {name} has weight shape {shapes.get(name)}")
            q = shapes.get(sp["q_proj"])
            if q is None or sp["in_features"] not in list(q):
                raise PlanError(f"head router for {name!r}: its input projection {sp['q_proj']!r} has weight "
                                f"shape {q}, not one of {sp['in_features']} inputs")

    def describe(self) -> str:
        if not self.specs:
            return "no head routers"
        mean = sum(self.density(n) for n in self.specs) / len(self.specs)
        return f"{len(self.specs)} head routers (mean head density {mean:.2f})"
