"""SparsityPlan: which masks go where, saved as JSON (tensors, if any, as safetensors).

A plan is keyed by module name (as in ``model.named_modules()``). It holds three kinds of rule:

* ``thresholds``: TEAL input masks, ``{linear module: t}``; that layer's input x becomes
  ``x * (|x| > t)``. Layers sharing an input (q/k/v, gate/up) may have different thresholds.
* ``activation_thresholds``: CATS masks, ``{down-projection module: t}``; the mask
  ``|act(gate(x))| > t`` skips rows of up_proj and columns of down_proj.
* ``stat_topk``: calibration-free per-token cutoffs for every site of the listed roles.
* ``predictors``: learned predictors (Deja Vu), ``{down-projection module: spec}``; a low-rank
  ``Linear(d, r) -> Linear(r, n)`` on the MLP input guesses the active neurons, so rows of
  gate, up and down are all skipped. The spec (JSON) names the gate/up modules, the rank and
  the selection (``keep`` top-k logits per token, or ``logit > threshold``); the weights live
  in ``predictor_tensors`` (``"<down>.w1"`` [r, d], ``"<down>.w2"`` [n, r], ``"<down>.b2"``
  [n]), saved next to the JSON as a safetensors file.

``score`` says what the input thresholds compare: ``"abs"`` is TEAL's ``|x_i|``; ``"wina"``
is ``|x_i| * ||W[:, i]||`` (WINA), the channel's magnitude times its weight column's norm, so
that a small input on a heavy column is kept. The backend takes the column norms from the
weights it compiles, so a plan stays a file of scalars.

It also records how it was made (method, target, measured sparsity per site and overall) and
a fingerprint of the model it was made for, so that a plan used on another model fails loudly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "actsparse-plan"
VERSION = 1
ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_down")
SCORES = ("abs", "wina")


class PlanError(ValueError):
    """A plan that does not fit the model, or a malformed plan file."""


def linear_weights(model: torch.nn.Module) -> dict[str, list[int]]:
    """Module name -> weight shape for every linear-like layer (nn.Linear, HF Conv1D)."""
    shapes = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and _is_linear_like(mod):
            shapes[name] = list(w.shape)
    return shapes


def _is_linear_like(mod: torch.nn.Module) -> bool:
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a plan needs to recognise its model: architecture and linear weight shapes."""
    cfg = getattr(model, "config", None)
    archs = getattr(cfg, "architectures", None) if cfg is not None else None
    arch = archs[0] if archs else type(model).__name__
    return {"architecture": arch, "weights": linear_weights(model)}


DISTRIBUTIONS = ("laplace", "gaussian")


@dataclass
class StatTopK:
    """Statistical top-k: per token, keep |x| above ``multiplier * mean(|x|)``, no calibration.

    The cutoff assumes a shape for each token's inputs across channels, with the scale taken
    from that token's mean |x| (a scale from rms(x) is dominated by a few outlier channels):

    * ``laplace`` (default): P(|x| <= c) = 1 - exp(-c / mean|x|), so c = -ln(1 - s) * mean|x|.
      On SmolLM2-135M's linear inputs this lands within about one point of the target
      (0.235 / 0.388 / 0.497 / 0.611 at 0.25 / 0.4 / 0.5 / 0.6).
    * ``gaussian`` (Spark Transformer's assumption): c = Phi^-1((1 + s) / 2) * sigma with
      sigma = sqrt(pi / 2) * mean|x|; heavier real tails make it overshoot (0.58 at 0.5).
    """

    sparsity: float
    roles: tuple[str, ...] = ROLES
    distribution: str = "laplace"

    @property
    def multiplier(self) -> float:
        if self.distribution == "gaussian":
            return normal_ppf((1.0 + self.sparsity) / 2.0) * math.sqrt(math.pi / 2.0)
        return -math.log1p(-self.sparsity)


def normal_ppf(p: float) -> float:
    """Phi^-1(p) for the standard normal, by bisection on erf (no scipy dependency)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    lo, hi = -12.0, 12.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class SparsityPlan:
    """Per-site mask rules for one model; see the module docstring."""

    thresholds: dict[str, float] = field(default_factory=dict)
    activation_thresholds: dict[str, float] = field(default_factory=dict)
    stat_topk: StatTopK | None = None
    method: str = "manual"
    target: float | None = None
    roles: dict[str, str] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    overall_sparsity: float | None = None
    model: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    score: str = "abs"
    predictors: dict[str, dict[str, Any]] = field(default_factory=dict)
    predictor_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise PlanError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        for kind, rules in (("thresholds", self.thresholds),
                            ("activation_thresholds", self.activation_thresholds)):
            for name, t in rules.items():
                if not isinstance(name, str):
                    raise PlanError(f"{kind}: module names must be strings, got {name!r}")
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                    raise PlanError(f"{kind}[{name!r}] must be a finite number >= 0, got {t!r}")
            rules.update({n: float(t) for n, t in rules.items()})
        if self.stat_topk is not None:
            s = self.stat_topk.sparsity
            if not 0.0 <= s < 1.0:
                raise PlanError(f"stat_topk sparsity must be in [0, 1), got {s}")
            if self.stat_topk.distribution not in DISTRIBUTIONS:
                raise PlanError(f"stat_topk distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                                f"got {self.stat_topk.distribution!r}")
            bad = [r for r in self.stat_topk.roles if r not in ROLES]
            if bad:
                raise PlanError(f"stat_topk roles {bad} unknown; allowed: {', '.join(ROLES)}")
        for name, spec in self.predictors.items():
            _check_predictor_spec(name, spec)

    @classmethod
    def from_thresholds(
        cls,
        model: torch.nn.Module,
        thresholds: Mapping[str, float],
        *,
        activation_thresholds: Mapping[str, float] | None = None,
        method: str = "manual",
        target: float | None = None,
        score: str = "abs",
    ) -> SparsityPlan:
        """A plan of TEAL input thresholds (and optional CATS thresholds) for ``model``.

        ``score="wina"`` makes each threshold apply to ``|x_i| * ||W[:, i]||`` instead of ``|x_i|``.
        """
        plan = cls(
            thresholds=dict(thresholds),
            activation_thresholds=dict(activation_thresholds or {}),
            method=method,
            target=target,
            model=fingerprint(model),
            score=score,
        )
        plan.validate(model)
        return plan

    @classmethod
    def statistical(cls, sparsity: float, model: torch.nn.Module | None = None,
                    roles: tuple[str, ...] = ROLES, distribution: str = "laplace") -> SparsityPlan:
        """A calibration-free plan: statistical top-k at ``sparsity`` on every site."""
        return cls(stat_topk=StatTopK(float(sparsity), tuple(roles), distribution), method="stat-topk",
                   target=float(sparsity), model=None if model is None else fingerprint(model))

    # ------------------------------------------------------------------ queries
    @property
    def is_empty(self) -> bool:
        return (not self.thresholds and not self.activation_thresholds and self.stat_topk is None
                and not self.predictors)

    def rule_names(self) -> set[str]:
        """Every module name a rule refers to."""
        return set(self.thresholds) | set(self.activation_thresholds) | set(self.predictors)

    def validate(self, model: torch.nn.Module) -> None:
        """Raise PlanError naming what does not fit: another model, unknown modules."""
        if self.model is not None:
            self.check_fingerprint(fingerprint(model))
        shapes = linear_weights(model)
        missing = sorted(n for n in self.rule_names() if n not in shapes)
        if missing:
            known = dict(model.named_modules())
            not_linear = [n for n in missing if n in known]
            absent = [n for n in missing if n not in known]
            parts = []
            if absent:
                parts.append(f"modules the model does not have: {_short(absent)}")
            if not_linear:
                parts.append(f"modules that are not linear layers: {_short(not_linear)}")
            raise PlanError("plan names " + "; ".join(parts))
        self.check_predictors(shapes)

    def check_predictors(self, shapes: Mapping[str, Any] | None = None) -> None:
        """Raise PlanError unless every predictor has its tensors, of shapes that fit its MLP.

        ``shapes`` (module -> weight shape) checks the gate/up modules too: a predictor for an
        MLP of d inputs and n neurons needs w1 [r, d], w2 [n, r] and b2 [n].
        """
        clash = [n for n, sp in self.predictors.items()
                 if n in self.activation_thresholds or {n, sp["gate"], sp["up"]} & set(self.thresholds)]
        if clash:
            raise PlanError(f"plan has a predictor and threshold rules on the same MLP: {_short(clash)}; "
                            "an MLP takes one or the other")
        for name, sp in self.predictors.items():
            d, n, r = sp["in_features"], sp["neurons"], sp["rank"]
            want = {f"{name}.w1": [r, d], f"{name}.w2": [n, r], f"{name}.b2": [n]}
            for key, shape in want.items():
                t = self.predictor_tensors.get(key)
                if t is None:
                    raise PlanError(f"predictor for {name!r} has no tensor {key!r} (was the plan's "
                                    "safetensors file saved with it?)")
                if list(t.shape) != shape:
                    raise PlanError(f"predictor tensor {key!r} has shape {list(t.shape)}, expected {shape}")
            if shapes is not None:
                for part in ("gate", "up"):
                    ws = shapes.get(sp[part])
                    if ws is None:
                        raise PlanError(f"predictor for {name!r}: the model has no linear {sp[part]!r}")
                    if list(ws) != [n, d]:
                        raise PlanError(f"predictor for {name!r} was made for an MLP of {d} inputs and "
                                        f"{n} neurons; {sp[part]} has weight shape {list(ws)}")

    def check_fingerprint(self, other: Mapping[str, Any]) -> None:
        """Raise PlanError if ``other`` (a fingerprint) is not the model this plan was made for."""
        if self.model is None:
            return
        mine = self.model
        if mine.get("architecture") != other.get("architecture"):
            raise PlanError(
                f"plan was made for a {mine.get('architecture')} model, not for "
                f"{other.get('architecture')}"
            )
        a, b = mine.get("weights", {}), other.get("weights", {})
        diff = [f"{n}: plan {a[n]} vs model {b.get(n)}" for n in a if list(a[n]) != list(b.get(n) or [])]
        if diff:
            raise PlanError("plan was made for another model (weight shapes differ): " + _short(diff))

    def check_weight_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Like check_fingerprint, for the weights a traced graph holds (partial view)."""
        if self.model is None:
            return
        a = self.model.get("weights", {})
        diff = [f"{n}: plan {a[n]} vs model {list(s)}" for n, s in shapes.items()
                if n in a and list(a[n]) != list(s)]
        if diff:
            raise PlanError("plan was made for another model (weight shapes differ): " + _short(diff))

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "target": self.target,
            "overall_sparsity": self.overall_sparsity,
            "thresholds": self.thresholds,
            "score": self.score,
            "activation_thresholds": self.activation_thresholds,
            "stat_topk": None if self.stat_topk is None else {
                "sparsity": self.stat_topk.sparsity, "roles": list(self.stat_topk.roles),
                "distribution": self.stat_topk.distribution},
            "roles": self.roles,
            "measured": self.measured,
            "model": self.model,
            "info": self.info,
            "predictors": self.predictors,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SparsityPlan:
        if d.get("format") != FORMAT:
            raise PlanError(f"not an actsparse plan (format field is {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise PlanError(f"plan version {d.get('version')} is not supported (expected {VERSION})")
        st = d.get("stat_topk")
        return cls(
            thresholds=dict(d.get("thresholds") or {}),
            activation_thresholds=dict(d.get("activation_thresholds") or {}),
            stat_topk=None if st is None else StatTopK(float(st["sparsity"]), tuple(st["roles"]),
                                                       st.get("distribution", "laplace")),
            method=d.get("method", "manual"),
            target=d.get("target"),
            roles=dict(d.get("roles") or {}),
            measured={k: float(v) for k, v in (d.get("measured") or {}).items()},
            overall_sparsity=d.get("overall_sparsity"),
            model=d.get("model"),
            info=dict(d.get("info") or {}),
            score=d.get("score", "abs"),
            predictors={k: dict(v) for k, v in (d.get("predictors") or {}).items()},
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (atomically: a reader never sees half a file).

        A plan with predictors also writes their weights to ``<path>.safetensors`` (never
        pickle); the JSON names that file and its tensors' shapes.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        if self.predictors:
            from safetensors.torch import save_file

            self.check_predictors()
            side = sidecar_path(path)
            tmp_side = side.with_name(side.name + ".tmp")
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
                       for k, v in sorted(self.predictor_tensors.items())}
            save_file(tensors, str(tmp_side), metadata={"format": FORMAT + "-predictors"})
            os.replace(tmp_side, side)
            d["predictor_file"] = side.name
            d["predictor_tensors"] = {k: list(v.shape) for k, v in tensors.items()}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(d, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> SparsityPlan:
        """Read a plan; with ``model``, also check that it fits that model."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON: {e}") from None
        plan = cls.from_dict(data)
        if plan.predictors:
            plan.predictor_tensors = _load_predictor_tensors(path, data)
            plan.check_predictors()
        if model is not None:
            plan.validate(model)
        return plan

    def summary(self) -> str:
        parts = [f"method={self.method}"]
        if self.target is not None:
            parts.append(f"target={self.target:.2f}")
        if self.overall_sparsity is not None:
            parts.append(f"measured={self.overall_sparsity:.3f}")
        parts.append(f"{len(self.thresholds)} input thresholds"
                     + (" on |x|*||W col||" if self.score == "wina" else ""))
        if self.activation_thresholds:
            parts.append(f"{len(self.activation_thresholds)} activation thresholds")
        if self.stat_topk is not None:
            parts.append(f"stat-topk s={self.stat_topk.sparsity:.2f}")
        if self.predictors:
            parts.append(f"{len(self.predictors)} MLP predictors")
        return "SparsityPlan(" + ", ".join(parts) + ")"

    __str__ = summary


def _short(items: list[str], n: int = 8) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


PREDICTOR_KEYS = ("gate", "up", "act", "rank", "in_features", "neurons", "selection", "keep", "threshold")
SELECTIONS = ("topk", "threshold")


def _check_predictor_spec(name: str, spec: Mapping[str, Any]) -> None:
    missing = [k for k in PREDICTOR_KEYS if k not in spec]
    if missing:
        raise PlanError(f"predictors[{name!r}] lacks {', '.join(missing)}")
    if spec["selection"] not in SELECTIONS:
        raise PlanError(f"predictors[{name!r}]: selection must be one of {', '.join(SELECTIONS)}, "
                        f"got {spec['selection']!r}")
    for k in ("rank", "in_features", "neurons", "keep"):
        v = spec[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"predictors[{name!r}][{k!r}] must be an integer >= 1, got {v!r}")
    if spec["keep"] > spec["neurons"]:
        raise PlanError(f"predictors[{name!r}]: keep {spec['keep']} exceeds {spec['neurons']} neurons")
    t = spec["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise PlanError(f"predictors[{name!r}]['threshold'] must be a finite number, got {t!r}")


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where a plan file's predictor weights live: ``plan.json`` -> ``plan.json.safetensors``."""
    path = Path(path)
    return path.with_name(path.name + ".safetensors")


def _load_predictor_tensors(path: Path, data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = data.get("predictor_file")
    if not name:
        raise PlanError(f"{path} has predictors but names no predictor weights file")
    if Path(name).name != name:
        raise PlanError(f"{path}: predictor_file must be a file name next to the plan, got {name!r}")
    side = path.with_name(name)
    if not side.exists():
        raise PlanError(f"predictor weights of {path} not found: {side}")
    try:
        tensors = load_file(str(side))
    except (SafetensorError, OSError, ValueError) as e:
        raise PlanError(f"{side} is not a readable safetensors file: {e}") from None
    listed = data.get("predictor_tensors") or {}
    for k, shape in listed.items():
        if k not in tensors:
            raise PlanError(f"{side} lacks tensor {k!r} that {path.name} lists")
        if list(tensors[k].shape) != list(shape):
            raise PlanError(f"{side}: tensor {k!r} has shape {list(tensors[k].shape)}, the plan says {shape}")
    return tensors
