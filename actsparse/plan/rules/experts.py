"""Dense-to-MoE experts (``actsparse.moefy``), keyed by an MLP's down projection.

The MLP's neurons were permuted so that each of ``experts`` equal experts is a contiguous
block (gate/up rows, down columns); a router on the MLP input predicts each expert's output
norm and an expert runs where its prediction exceeds ``threshold`` (dynamic-k). The spec
names gate/up, the activation, the shapes, the router's form (``"linear"``: ``x W1^T + b1``;
``"mlp"``: ``relu(x W1^T + b1) W2^T + b2`` with ``hidden`` units) and the calibrated density.

Sidecar tensors per MLP: ``"<down>.w1"``, ``"<down>.b1"`` (and ``"<down>.w2"``, ``"<down>.b2"``
for an MLP router), and ``"<down>.perm"``, the permutation applied to the neurons (new neuron
j is original neuron ``perm[j]``), so that ``actsparse.train.moefy.permute`` can make the
expert layout from the original weights again. The plan applies to the permuted model.

Plan file field: ``"experts": {"model.layers.0.mlp.down_proj": {...}, ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import PlanError, expect_int, expect_mapping, expect_number, expect_str, show
from .base import PerModuleRule, register_rule

SPEC_KEYS = ("gate", "up", "act", "experts", "in_features", "neurons", "router", "hidden", "threshold", "density")
ROUTERS = ("linear", "mlp")


def check_spec(name: str, spec: Any) -> dict[str, Any]:
    where = f"experts[{name!r}]"
    spec = dict(expect_mapping(spec, where))
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise PlanError(f"{where} must have the keys {', '.join(SPEC_KEYS)}; it lacks {', '.join(missing)}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise PlanError(f"{where} has unknown keys {unknown}; known: {', '.join(SPEC_KEYS)}")
    for k in ("gate", "up", "act"):
        expect_str(spec[k], f"{where}[{k!r}]")
    expect_str(spec["router"], f"{where}['router']", ROUTERS)
    for k in ("experts", "in_features", "neurons"):
        expect_int(spec[k], f"{where}[{k!r}]", low=1)
    expect_int(spec["hidden"], f"{where}['hidden']", low=0)
    if spec["neurons"] % spec["experts"]:
        raise PlanError(f"{where}: {spec['neurons']} neurons do not split into {spec['experts']} equal experts")
    if (spec["router"] == "mlp") != (spec["hidden"] > 0):
        raise PlanError(f"{where}: an 'mlp' router needs hidden >= 1 and a 'linear' one hidden 0, "
                        f"got router {spec['router']!r} with hidden {spec['hidden']}")
    expect_number(spec["threshold"], f"{where}['threshold']")
    expect_number(spec["density"], f"{where}['density']", low=0.0, high=1.0)
    return spec


def tensor_shapes(name: str, sp: Mapping[str, Any]) -> dict[str, list[int]]:
    """The sidecar tensors an MLP's spec needs, with their shapes."""
    d, n, e, r = sp["in_features"], sp["neurons"], sp["experts"], sp["hidden"]
    if sp["router"] == "linear":
        want = {"w1": [e, d], "b1": [e]}
    else:
        want = {"w1": [r, d], "b1": [r], "w2": [e, r], "b2": [e]}
    want["perm"] = [n]
    return {f"{name}.{k}": s for k, s in want.items()}


@register_rule
@dataclass
class Experts(PerModuleRule):
    kind = "experts"
    fields = ("experts",)
    has_tensors = True

    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    tensor_label = "experts tensors"
    tensor_owner = "MLP"

    def __post_init__(self) -> None:
        self.specs = {n: check_spec(n, s) for n, s in expect_mapping(self.specs, "experts").items()}
        self.weights = self.typed_tensors(self.weights)

    def input_major_modules(self, linears: list[str]) -> set[str]:
        return set(self.specs)  # the down projection: an expert's columns become contiguous rows

    def router(self, name: str) -> list[torch.Tensor]:
        """The router tensors of one MLP: [w1, b1] or [w1, b1, w2, b2]."""
        parts = ("w1", "b1") if self.specs[name]["router"] == "linear" else ("w1", "b1", "w2", "b2")
        return [self.weights[f"{name}.{p}"] for p in parts]

    def perm(self, name: str) -> torch.Tensor:
        return self.weights[f"{name}.perm"]

    def tensor_shapes(self, name: str, spec: dict[str, Any]) -> dict[str, list[int]]:
        return tensor_shapes(name, spec)

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        # the sidecar stores fp32 (exact for integers below 2**24): permutations come back as int64
        super().load_tensors({k: t.long() if k.endswith(".perm") and isinstance(t, torch.Tensor) and
                              torch.equal(t, t.round()) else t
                              for k, t in expect_mapping(tensors, self.tensor_label).items()})

    def check_spec_tensors(self, name: str, spec: dict[str, Any]) -> None:
        p = self.weights[f"{name}.perm"]
        if p.dtype != torch.int64 or not torch.equal(p.sort().values, torch.arange(p.numel())):
            raise PlanError(f"experts[{name!r}]: tensor '{name}.perm' must be a permutation of "
                            f"0..{p.numel() - 1} (int64)")

    def check(self, shapes: Mapping[str, list[int]]) -> None:
        self.check_tensors()
        for name, sp in self.specs.items():
            d, n = sp["in_features"], sp["neurons"]
            for part, want in (("gate", [n, d]), ("up", [n, d])):
                ws = shapes.get(sp[part])
                if ws is None:
                    raise PlanError(f"experts for {name!r}: the model has no linear {sp[part]!r}")
                if list(ws) != want:
                    raise PlanError(f"experts for {name!r} were made for an MLP of {d} inputs and {n} neurons; "
                                    f"{sp[part]} has weight shape {list(ws)}")
            if name in shapes and list(shapes[name]) != [d, n]:
                raise PlanError(f"experts for {name!r}: its weight shape {shapes[name]} is not [{d}, {n}]")

    def claimed(self) -> dict[str, str]:
        """Every module of an expert MLP (gate, up, down) -> its down projection."""
        out = {}
        for name, sp in self.specs.items():
            out.update({name: name, sp["gate"]: name, sp["up"]: name})
        return out

    def describe(self) -> str:
        es = sorted({s["experts"] for s in self.specs.values()})
        dens = [s["density"] for s in self.specs.values()]
        mean = sum(dens) / len(dens) if dens else 0.0
        return f"{len(self.specs)} expert MLPs (E={show(es[0] if len(es) == 1 else es)}, density {mean:.2f})"
