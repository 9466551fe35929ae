"""Sparse plus low-rank linears (after R-Sparse): ``y = W (x*m) + A (B (x*(1-m))) + b``.

``m = |x| > t``: the large input channels go through the weight itself, read input-sparse as
with a TEAL threshold; the rest through a rank-r factorisation ``A B`` of the weight (from its
SVD), two thin dense products. Per linear the plan holds the threshold, the fraction of inputs
it masked on the calibration data (the kernels' sparsity hint), the rank and the weight's shape; the factors are the tensors ``"<module>.a"`` [out, r] and ``"<module>.b"``
[r, in], saved in the plan's safetensors sidecar. Rank 0 is a plain TEAL threshold (no tensors).
A linear of an rsparse rule must have no other input rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import PlanError, expect_int, expect_mapping, expect_number, show
from .base import PerModuleRule, register_rule

SPEC_KEYS = ("threshold", "sparsity", "rank", "in_features", "out_features")


def check_entry(name: str, spec: Any) -> dict[str, Any]:
    where = f"rsparse[{name!r}]"
    spec = dict(expect_mapping(spec, where))
    missing = [k for k in SPEC_KEYS if k not in spec]
    extra = sorted(set(spec) - set(SPEC_KEYS))
    if missing or extra:
        raise PlanError(f"{where} must have exactly the keys {', '.join(SPEC_KEYS)}"
                        + (f"; it lacks {', '.join(missing)}" if missing else "")
                        + (f"; unknown {', '.join(extra)}" if extra else ""))
    spec["threshold"] = float(expect_number(spec["threshold"], f"{where}['threshold']", low=0.0))
    spec["sparsity"] = float(expect_number(spec["sparsity"], f"{where}['sparsity']", low=0.0, high=1.0))
    for k in ("in_features", "out_features"):
        spec[k] = expect_int(spec[k], f"{where}[{k!r}]", low=1)
    spec["rank"] = expect_int(spec["rank"], f"{where}['rank']", low=0)
    if spec["rank"] > min(spec["in_features"], spec["out_features"]):
        raise PlanError(f"{where}['rank'] must be at most min(in_features, out_features) = "
                        f"{min(spec['in_features'], spec['out_features'])}, got {show(spec['rank'])}")
    return spec


@register_rule
@dataclass
class LowRankSparse(PerModuleRule):
    kind = "rsparse"
    tensor_attr = "factors"
    tensor_label = "rsparse tensors"
    tensor_owner = "linear of positive rank"
    fields = ("rsparse",)
    has_tensors = True

    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.specs = {n: check_entry(n, s) for n, s in expect_mapping(self.specs, "rsparse").items()}
        self.factors = self.typed_tensors(self.factors)

    def input_major_modules(self, linears: list[str]) -> set[str]:
        return set(self.specs)

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [out, r], B [r, in]) of a linear, or None at rank 0."""
        if self.specs[name]["rank"] == 0:
            return None
        return self.factors[f"{name}.a"], self.factors[f"{name}.b"]

    def tensor_shapes(self, name: str, spec: dict[str, Any]) -> dict[str, list[int]]:
        r, k, n = spec["rank"], spec["in_features"], spec["out_features"]
        return {} if r == 0 else {f"{name}.a": [n, r], f"{name}.b": [r, k]}

    def check(self, shapes: Mapping[str, list[int]]) -> None:
        self.check_tensors()
        for name, sp in self.specs.items():
            ws = shapes.get(name)
            # nn.Linear stores [out, in]; HF's Conv1D (GPT-2) stores [in, out]
            if ws is not None and list(ws) not in ([sp["out_features"], sp["in_features"]],
                                                    [sp["in_features"], sp["out_features"]]):
                raise PlanError(f"rsparse[{name!r}] was made for a {sp['in_features']} -> {sp['out_features']} "
                                f"linear; the model's weight has shape {list(ws)}")

    def lowrank_params(self) -> int:
        """Weights the low-rank parts read per token: sum of r * (in + out)."""
        return sum(s["rank"] * (s["in_features"] + s["out_features"]) for s in self.specs.values())

    def describe(self) -> str:
        ranked = sum(1 for s in self.specs.values() if s["rank"] > 0)
        return f"{len(self.specs)} sparse + low-rank linears ({ranked} with rank > 0)"


