"""Exact zeros of the MLP activation itself, keyed by an MLP's down projection.

For a ReLU-family activation (relufied models) many neurons are exactly zero: no threshold,
no approximation. The rule says "skip what is zero": on a gated MLP the backend lowers it to
the CATS gated-MLP op with threshold 0 (the gate runs in full, up rows and down columns of
inactive neurons are skipped, the down projection read input-sparse); on any other MLP
(plain ``fc2(act(fc1 x))``, dReLU's ``relu(gate) * relu(up)``) to an exact-zero input mask on
the down projection. The compiled model equals the eager one up to rounding.

Plan file field: ``"exact": ["model.layers.0.mlp.down_proj", ...]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..checks import PlanError, show
from .base import Rule, register_rule


def check_names(values: Any, where: str = "exact") -> list[str]:
    """A sorted list of distinct module names (a list of strings in the file)."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise PlanError(f"{where} must be a list of module names (down projections), got {show(values)}")
    names = list(values)
    bad = [v for v in names if not isinstance(v, str) or not v]
    if bad:
        raise PlanError(f"{where} must hold non-empty module names, got {show(bad[0])}")
    dup = sorted({v for v in names if names.count(v) > 1})
    if dup:
        raise PlanError(f"{where} names {show(dup)} more than once")
    return sorted(names)


@register_rule
@dataclass
class ExactZeros(Rule):
    kind = "exact"
    fields = ("exact",)

    modules_: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.modules_ = check_names(self.modules_)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExactZeros | None:
        values = data.get("exact")
        return None if values is None else cls(values)

    def to_json(self) -> dict[str, Any]:
        return {"exact": list(self.modules_)}

    def modules(self) -> set[str]:
        return set(self.modules_)

    def input_major_modules(self, linears: list[str]) -> set[str]:
        return set(self.modules_)  # the down projection is read input-sparse

    def check(self, shapes: Mapping[str, list[int]]) -> None:
        wrong = [n for n in self.modules_ if n in shapes and len(shapes[n]) != 2]
        if wrong:
            raise PlanError(f"exact: {show(wrong)} are not 2-d linear weights")

    def describe(self) -> str:
        return f"{len(self.modules_)} exact-zero MLPs"
