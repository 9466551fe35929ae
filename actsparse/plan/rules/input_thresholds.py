"""TEAL input thresholds: the input x of a linear becomes ``x * (|x| > t)``.

Linears sharing an input (q/k/v, gate/up) may have different thresholds. ``score`` says what
the thresholds compare: ``"abs"`` is TEAL's ``|x_i|``; ``"wina"`` is WINA's
``|x_i| * ||W[:, i]||``, the channel's magnitude times its weight column's norm, so that a
small input on a heavy column is kept. The backend takes the column norms from the weights it
compiles, so a plan stays a file of scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..checks import expect_str, number_map
from .base import Rule, register_rule

SCORES = ("abs", "wina")


@register_rule
@dataclass
class InputThresholds(Rule):
    kind = "thresholds"
    fields = ("thresholds", "score")

    values: dict[str, float] = field(default_factory=dict)
    score: str = "abs"

    def __post_init__(self) -> None:
        self.values = number_map(self.values, "thresholds", low=0.0)
        expect_str(self.score, "score", SCORES)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InputThresholds | None:
        values, score = data.get("thresholds"), data.get("score", "abs")
        if values is None and score == "abs":
            return None
        return cls(values if values is not None else {}, score)

    def to_json(self) -> dict[str, Any]:
        return {"thresholds": dict(self.values), "score": self.score}

    def modules(self) -> set[str]:
        return set(self.values)

    def is_empty(self) -> bool:
        return not self.values

    def input_major_modules(self, linears: list[str]) -> set[str]:
        return set(self.values)

    def check(self, shapes: Mapping[str, list[int]]) -> None:
        pass  # names are checked by the plan; any linear accepts an input threshold

    def describe(self) -> str:
        return f"{len(self.values)} input thresholds" + (" on |x|*||W col||" if self.score == "wina" else "")


