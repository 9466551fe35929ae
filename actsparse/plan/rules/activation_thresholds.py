"""CATS activation thresholds, keyed by an MLP's down projection.

The mask ``|act(gate(x))| > t`` skips rows of up_proj and columns of down_proj (the gate runs
in full: its output is what the mask is computed from). On a plain MLP (fc1 -> act -> fc2)
the activation is the down projection's input, so the rule is a threshold on that input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..checks import number_map
from .base import Rule, register_rule


@register_rule
@dataclass
class ActivationThresholds(Rule):
    kind = "activation_thresholds"
    fields = ("activation_thresholds",)

    values: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = number_map(self.values, "activation_thresholds", low=0.0)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ActivationThresholds | None:
        values = data.get("activation_thresholds")
        return None if values is None else cls(values)

    def to_json(self) -> dict[str, Any]:
        return {"activation_thresholds": dict(self.values)}

    def modules(self) -> set[str]:
        return set(self.values)

    def input_major_modules(self, linears: list[str]) -> set[str]:
        return set(self.values)  # the down projection: input-sparse; up stays row-major

    def describe(self) -> str:
        return f"{len(self.values)} activation thresholds"
