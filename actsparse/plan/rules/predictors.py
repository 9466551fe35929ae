"""Learned predictors (Deja Vu), keyed by an MLP's down projection.

A low-rank ``Linear(d, r) -> Linear(r, n)`` on the MLP input guesses the active neurons, so
rows of gate, up and down are all skipped. The spec names the gate/up modules, the rank and
the selection (``keep`` top-k logits per token, or ``logit > threshold``); the weights are
the tensors ``"<down>.w1"`` [r, d], ``"<down>.w2"`` [n, r] and ``"<down>.b2"`` [n], saved in
the plan's safetensors sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import PlanError, expect_int, expect_mapping, expect_number, expect_str, short_list, show
from .base import PerModuleRule, register_rule

SPEC_KEYS = ("gate", "up", "act", "rank", "in_features", "neurons", "selection", "keep", "threshold")
SELECTIONS = ("topk", "threshold")
PARTS = ("w1", "w2", "b2")


def check_spec(name: str, spec: Any) -> dict[str, Any]:
    where = f"predictors[{name!r}]"
    spec = dict(expect_mapping(spec, where))
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise PlanError(f"{where} must have the keys {', '.join(SPEC_KEYS)}; it lacks {', '.join(missing)}")
    for k in ("gate", "up", "act"):
        expect_str(spec[k], f"{where}[{k!r}]")
    expect_str(spec["selection"], f"{where}['selection']", SELECTIONS)
    for k in ("rank", "in_features", "neurons", "keep"):
        expect_int(spec[k], f"{where}[{k!r}]", low=1)
    if spec["keep"] > spec["neurons"]:
        raise PlanError(f"{where}['keep'] must be at most neurons ({spec['neurons']}), got {show(spec['keep'])}")
    expect_number(spec["threshold"], f"{where}['threshold']")
    return spec


@register_rule
@dataclass
class Predictors(PerModuleRule):
    kind = "predictors"
    fields = ("predictors",)
    has_tensors = True

    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    tensor_label = "predictor tensors"
    tensor_owner = "predictor"

    def __post_init__(self) -> None:
        self.specs = {n: check_spec(n, s) for n, s in expect_mapping(self.specs, "predictors").items()}
        self.weights = self.typed_tensors(self.weights)

    def input_major_modules(self, linears: list[str]) -> set[str]:
        return set(self.specs)  # the down projection; gate and up stay row-major (output-sparse)

    def tensor_shapes(self, name: str, spec: dict[str, Any]) -> dict[str, list[int]]:
        d, n, r = spec["in_features"], spec["neurons"], spec["rank"]
        return {f"{name}.w1": [r, d], f"{name}.w2": [n, r], f"{name}.b2": [n]}

    def check(self, shapes: Mapping[str, list[int]]) -> None:
        self.check_tensors()
        for name, sp in self.specs.items():
            d, n = sp["in_features"], sp["neurons"]
            for part in ("gate", "up"):
                ws = shapes.get(sp[part])
                if ws is None:
                    raise PlanError(f"predictor for {name!r}: the model has no linear {sp[part]!r}")
                if list(ws) != [n, d]:
                    raise PlanError(f"predictor for {name!r} was made for an MLP of {d} inputs and "
                                    f"{n} neurons; {sp[part]} has weight shape {list(ws)}")

    def claimed(self) -> dict[str, str]:
        """Every module of a predicted MLP (gate, up, down) -> its down projection."""
        out = {}
        for name, sp in self.specs.items():
            out.update({name: name, sp["gate"]: name, sp["up"]: name})
        return out

    def describe(self) -> str:
        return f"{len(self.specs)} MLP predictors"


def check_predictor_clash(predictors: Predictors, thresholds: set[str], activations: set[str]) -> None:
    claimed = predictors.claimed()
    clash = sorted({claimed[m] for m in thresholds if m in claimed} | (set(predictors.specs) & activations))
    if clash:
        raise PlanError(f"plan has a predictor and threshold rules on the same MLP: {short_list(clash)}; "
                        "an MLP takes one or the other")
