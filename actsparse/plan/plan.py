"""SparsityPlan: which masks go where in one model, and how the plan was made.

A plan is keyed by module name (as in ``model.named_modules()``) and holds rules of the kinds
registered in ``actsparse.plan.rules`` (TEAL input thresholds, CATS activation thresholds,
statistical top-k, learned predictors, ...). It also records how it was made (method, target,
measured sparsity per site and overall) and a fingerprint of the model it was made for, so
that a plan used on another model fails with a message naming the mismatch.

The common kinds have attribute shortcuts (``plan.thresholds``, ``plan.activation_thresholds``,
``plan.stat_topk``, ``plan.predictors``); any kind is reachable as ``plan.rule(Kind)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from .checks import (PlanError, expect_mapping, expect_optional_mapping, expect_optional_number, expect_str,
                     number_map, short_list, show)
from .files import FORMAT, READABLE_VERSIONS, VERSION, read_plan, write_plan
from .fingerprint import check_fingerprint, check_weight_shapes, fingerprint, linear_weights, parse_fingerprint
from .rules import (ROLES, RULE_KINDS, ActivationThresholds, InputThresholds, Predictors, Rule, StatTopK,
                    check_predictor_clash, rule_fields)
from .rules.base import PLAN_FIELDS

R = TypeVar("R", bound=Rule)

#: Fields of a plan file that are not rules: how and for which model it was made.
_META_FIELDS = PLAN_FIELDS  # defined with the rule registry, which refuses kinds that claim them


class SparsityPlan:
    """Per-site mask rules for one model; see the module docstring."""

    def __init__(
        self,
        thresholds: Mapping[str, float] | None = None,
        activation_thresholds: Mapping[str, float] | None = None,
        stat_topk: StatTopK | None = None,
        method: str = "manual",
        target: float | None = None,
        roles: Mapping[str, str] | None = None,
        measured: Mapping[str, float] | None = None,
        overall_sparsity: float | None = None,
        model: dict[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        score: str = "abs",
        predictors: Mapping[str, Mapping[str, Any]] | None = None,
        predictor_tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        rules: Iterable[Rule] = (),
    ) -> None:
        self.rules: dict[str, Rule] = {}
        # the rules check their arguments (a list where a mapping belongs is a PlanError naming it)
        if thresholds is not None or score != "abs":
            self.add(InputThresholds({} if thresholds is None else thresholds, score))
        if activation_thresholds is not None:
            self.add(ActivationThresholds(activation_thresholds))
        if stat_topk is not None:
            self.add(stat_topk)
        if predictors is not None or predictor_tensors:
            self.add(Predictors({} if predictors is None else predictors,
                                {} if predictor_tensors is None else predictor_tensors))
        for r in rules:
            self.add(r)
        self.method = method
        self.target = target
        self.roles = dict(roles or {})
        self.measured = dict(measured or {})
        self.overall_sparsity = overall_sparsity
        self.model = model
        self.info = dict(info or {})

    # ------------------------------------------------------------------ rules
    def add(self, rule: Rule) -> Rule:
        """Add (or replace) the plan's rule of ``rule``'s kind."""
        if not isinstance(rule, Rule):
            raise PlanError(f"a plan holds Rule objects, got {type(rule).__name__}")
        self.rules[rule.kind] = rule
        return rule

    def rule(self, kind: type[R]) -> R | None:
        """The plan's rule of this kind, or None."""
        r = self.rules.get(kind.kind)
        return r if isinstance(r, kind) else None

    def _rule_or_new(self, kind: type[R]) -> R:
        r = self.rule(kind)
        return r if r is not None else self.add(kind())  # type: ignore[call-arg,return-value]

    @property
    def thresholds(self) -> dict[str, float]:
        """TEAL input thresholds, module -> t (the live dict of the plan's InputThresholds)."""
        return self._rule_or_new(InputThresholds).values

    @thresholds.setter
    def thresholds(self, values: Mapping[str, float]) -> None:
        self._rule_or_new(InputThresholds).values = InputThresholds(values).values

    @property
    def score(self) -> str:
        r = self.rule(InputThresholds)
        return "abs" if r is None else r.score

    @property
    def activation_thresholds(self) -> dict[str, float]:
        """CATS activation thresholds, down projection -> t (the live dict of the rule)."""
        return self._rule_or_new(ActivationThresholds).values

    @activation_thresholds.setter
    def activation_thresholds(self, values: Mapping[str, float]) -> None:
        self._rule_or_new(ActivationThresholds).values = ActivationThresholds(values).values

    @property
    def stat_topk(self) -> StatTopK | None:
        return self.rule(StatTopK)

    @stat_topk.setter
    def stat_topk(self, rule: StatTopK | None) -> None:
        if rule is None:
            self.rules.pop(StatTopK.kind, None)
        else:
            self.add(rule)

    @property
    def predictors(self) -> dict[str, dict[str, Any]]:
        return self._rule_or_new(Predictors).specs

    @property
    def predictor_tensors(self) -> dict[str, torch.Tensor]:
        return self._rule_or_new(Predictors).weights

    @predictor_tensors.setter
    def predictor_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._rule_or_new(Predictors).weights = Predictors(weights=tensors).weights

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_thresholds(cls, model: torch.nn.Module, thresholds: Mapping[str, float], *,
                        activation_thresholds: Mapping[str, float] | None = None, method: str = "manual",
                        target: float | None = None, score: str = "abs") -> SparsityPlan:
        """A plan of TEAL input thresholds (and optional CATS thresholds) for ``model``.

        ``score="wina"`` makes each threshold apply to ``|x_i| * ||W[:, i]||`` instead of ``|x_i|``.
        """
        plan = cls(thresholds=thresholds, activation_thresholds={} if activation_thresholds is None
                   else activation_thresholds, method=method, target=target, model=fingerprint(model), score=score)
        plan.validate(model)
        return plan

    @classmethod
    def statistical(cls, sparsity: float, model: torch.nn.Module | None = None,
                    roles: tuple[str, ...] = ROLES, distribution: str = "laplace") -> SparsityPlan:
        """A calibration-free plan: statistical top-k at ``sparsity`` on every site."""
        rule = StatTopK(sparsity, roles, distribution)  # checks each argument (a bool is no sparsity)
        return cls(stat_topk=rule, method="stat-topk", target=rule.sparsity,
                   model=None if model is None else fingerprint(model))

    # ------------------------------------------------------------------ queries
    @property
    def is_empty(self) -> bool:
        return all(r.is_empty() for r in self.rules.values())

    def rule_names(self) -> set[str]:
        """Every module name a rule is keyed by."""
        return set().union(*(r.modules() for r in self.rules.values()))

    def input_major_modules(self, model: torch.nn.Module) -> list[str]:
        """Names of the nn.Linear modules whose weights the plan's ops read input-sparse."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
        names = set().union(*(r.input_major_modules(linears) for r in self.rules.values()))
        mods = dict(model.named_modules())
        return sorted(n for n in names if isinstance(mods.get(n), torch.nn.Linear)
                      and not hasattr(mods[n], "qweight")  # quantized weights are stored input-major already
                      and type(mods[n].weight).__module__.split(".")[0] != "torchao")  # torchao: converted by the pass

    def check_consistency(self) -> None:
        """Raise PlanError where two rules claim the same MLP, or a rule lacks its tensors."""
        preds = self.rule(Predictors)
        if preds is not None and not preds.is_empty():
            acts = self.rule(ActivationThresholds)
            check_predictor_clash(preds, set(self.thresholds) if self.rule(InputThresholds) else set(),
                                  set(acts.values) if acts else set())
            preds.check_tensors()

    def validate(self, model: torch.nn.Module) -> None:
        """Raise PlanError naming what does not fit: another model, unknown modules, bad shapes."""
        if self.model is not None:
            check_fingerprint(self.model, fingerprint(model))
        shapes = linear_weights(model)
        missing = sorted(n for n in self.rule_names() if n not in shapes)
        if missing:
            known = dict(model.named_modules())
            not_linear = [n for n in missing if n in known]
            absent = [n for n in missing if n not in known]
            parts = []
            if absent:
                parts.append(f"modules the model does not have: {short_list(absent)}")
            if not_linear:
                parts.append(f"modules that are not linear layers: {short_list(not_linear)}")
            raise PlanError("plan names " + "; ".join(parts))
        self.check_consistency()
        for r in self.rules.values():
            r.check(shapes)

    def check_fingerprint(self, other: Mapping[str, Any]) -> None:
        """Raise PlanError if ``other`` (a fingerprint) is not the model this plan was made for."""
        check_fingerprint(self.model, other)

    def check_weight_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Like check_fingerprint, for the weights a traced graph holds (partial view)."""
        check_weight_shapes(self.model, shapes)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """The plan file's JSON (without tensors: see ``tensors``)."""
        d: dict[str, Any] = {"format": FORMAT, "version": VERSION, "method": self.method, "target": self.target,
                             "overall_sparsity": self.overall_sparsity, "roles": self.roles,
                             "measured": self.measured, "model": self.model, "info": self.info}
        for r in self.rules.values():
            d.update(r.to_json())
        return d

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every rule's tensors, keyed ``"<kind>/<key>"`` (the sidecar's layout)."""
        return {f"{r.kind}/{k}": t for r in self.rules.values() for k, t in r.tensors().items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> SparsityPlan:
        """A plan from its JSON (and sidecar tensors); every malformed field is a PlanError naming it."""
        d = expect_mapping(d, "the plan file")
        if d.get("format") != FORMAT:
            raise PlanError(f"format must be {FORMAT!r} (is this an actsparse plan?), got {show(d.get('format'))}")
        version = d.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:  # True == 1, but is no version
            raise PlanError(f"version must be one of {', '.join(map(str, READABLE_VERSIONS))} "
                            f"(the plan versions this actsparse reads), got {show(version)}")
        unknown = sorted(set(d) - _META_FIELDS - rule_fields())
        if unknown:
            raise PlanError(f"unknown plan field(s) {unknown}; known: {', '.join(sorted(_META_FIELDS | rule_fields()))}")
        plan = cls(
            method=expect_str(d.get("method", "manual"), "method"),
            target=expect_optional_number(d.get("target"), "target", low=0.0, high=1.0),
            roles={k: expect_str(v, f"roles[{k!r}]")
                   for k, v in expect_optional_mapping(d.get("roles"), "roles").items()},
            measured=number_map(expect_optional_mapping(d.get("measured"), "measured"), "measured", low=0.0, high=1.0),
            overall_sparsity=expect_optional_number(d.get("overall_sparsity"), "overall_sparsity", low=0.0, high=1.0),
            model=parse_fingerprint(d.get("model")),
            info=dict(expect_optional_mapping(d.get("info"), "info")),
        )
        by_kind: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in (tensors or {}).items():
            kind, _, local = key.partition("/")
            by_kind.setdefault(kind, {})[local] = t
        for kind, cls_ in RULE_KINDS.items():
            r = cls_.from_json(d)
            if r is not None:
                plan.add(r)
                if r.has_tensors:
                    r.load_tensors(by_kind.pop(kind, {}))
        if by_kind:
            raise PlanError(f"tensors: the plan's tensor file holds tensors of {sorted(by_kind)}, but the plan has "
                            "no rules of these kinds that keep tensors")
        plan.check_consistency()
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, and its tensors (if any) to ``<path>.safetensors``; atomically."""
        self.check_consistency()
        return write_plan(path, self.to_dict(), self.tensors())

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> SparsityPlan:
        """Read a plan; with ``model``, also check that it fits that model."""
        data, tensors = read_plan(path)
        plan = cls.from_dict(data, tensors)
        if model is not None:
            plan.validate(model)
        return plan

    def summary(self) -> str:
        parts = [f"method={self.method}"]
        if self.target is not None:
            parts.append(f"target={self.target:.2f}")
        if self.overall_sparsity is not None:
            parts.append(f"measured={self.overall_sparsity:.3f}")
        parts += [r.describe() for r in self.rules.values() if not r.is_empty()]
        return "SparsityPlan(" + ", ".join(parts) + ")"

    __str__ = summary

    def __repr__(self) -> str:
        return self.summary()

    def _compared(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What equality compares: the file's JSON and tensors, without empty rules (reading
        ``plan.thresholds`` adds an empty rule to a plan, and must not make it unequal)."""
        d = self.to_dict()
        for r in self.rules.values():
            if r.is_empty():
                for f in r.fields:
                    d.pop(f, None)
        return d, {f"{r.kind}/{k}": t for r in self.rules.values() if not r.is_empty() for k, t in r.tensors().items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparsityPlan):
            return NotImplemented
        (d, mine), (e, theirs) = self._compared(), other._compared()
        return (d == e and mine.keys() == theirs.keys()
                and all(torch.equal(mine[k], theirs[k]) for k in mine))

    __hash__ = None  # plans are mutable
