"""Relufication: swap a gated MLP's activation for a ReLU-family one, so that most neurons are
exactly zero (ReLU Strikes Back, ProSparse, TurboSparse), and make the ``exact`` plan for it.

Variants (Hugging Face gated MLPs: ``down(act(gate x) * up x)`` with ``act_fn``, as in Llama,
Qwen, Mistral, Gemma):

* ``relu``: ``act_fn`` becomes ReLU.
* ``relu-gate``: as ``relu``, and ReLU on the MLP input too (a forward pre-hook on the MLP), so
  gate and up read an exactly sparse input; the plan adds threshold-0 input masks on them.
* ``shifted-relu``: ``relu(gate x - b)`` with a shift b per MLP, folded into a gate bias so the
  backend still sees the gated pattern; b is given, or calibrated so that a target fraction of
  the gate pre-activations on some tokens falls below it.
* ``drelu``: ReLU on both gate and up (TurboSparse): the up projection's output goes through a
  ReLU too, so ``act * up`` is zero where either is.

Without a fine-tune the model's quality drops; ``actsparse.train.distill`` recovers it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import SparsityPlan, fingerprint
from ..plan.rules.exact import ExactZeros
from ..plan.rules.input_thresholds import InputThresholds

VARIANTS = ("relu", "relu-gate", "shifted-relu", "drelu")
_MARK = "_actsparse_relufied"


class ReLUOutLinear(nn.Linear):
    """A linear whose output goes through ReLU (dReLU's up projection); same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.linear(x, self.weight, self.bias))


@dataclass
class GatedMLP:
    """One gated MLP of a model: its module and name prefix."""

    name: str
    module: nn.Module

    def part(self, p: str) -> str:
        return f"{self.name}.{p}"


def gated_mlps(model: nn.Module) -> list[GatedMLP]:
    """Every ``gate_proj / up_proj / down_proj / act_fn`` MLP of the model, in module order."""
    found = []
    for name, mod in model.named_modules():
        if all(isinstance(getattr(mod, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")) \
                and hasattr(mod, "act_fn"):
            found.append(GatedMLP(name, mod))
    return found


def _relu_input(module: nn.Module, args):
    return (torch.relu(args[0]),) + tuple(args[1:])


def _gate_preact_quantiles(model: nn.Module, mlps: list[GatedMLP], tokens: torch.Tensor, q: float,
                           max_values: int = 1 << 20) -> list[float]:
    """Per MLP, the q-quantile of its gate pre-activations over ``tokens`` (a subsample)."""
    seen: dict[int, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)

    def keep(i):
        def hook(mod, args, out):
            v = out.detach().float().reshape(-1)
            if v.numel() > max_values:
                v = v[torch.randint(v.numel(), (max_values,), generator=gen)]
            seen[i] = v if i not in seen else torch.cat([seen[i], v])[-max_values:]
        return hook

    handles = [m.module.gate_proj.register_forward_hook(keep(i)) for i, m in enumerate(mlps)]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return [float(torch.quantile(seen[i], q)) for i in range(len(mlps))]


def _shifts(model, mlps, shift, tokens, sparsity) -> list[float]:
    if sparsity is not None:
        if tokens is None:
            raise ValueError("relufy: sparsity= calibrates the shifts and needs tokens=")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
            raise ValueError(f"relufy: sparsity must be a number in (0, 1), got {sparsity!r}")
        return _gate_preact_quantiles(model, mlps, tokens, float(sparsity))
    values = [shift] * len(mlps) if isinstance(shift, (int, float)) and not isinstance(shift, bool) else list(shift)
    if len(values) != len(mlps):
        raise ValueError(f"relufy: shift has {len(values)} values, the model has {len(mlps)} MLPs")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"relufy: shifts must be finite numbers, got {v!r}")
    return [float(v) for v in values]


def _fold_shift(mlp: nn.Module, b: float) -> None:
    """``relu(gate x - b)`` as a gate bias of ``-b`` (added to any bias the gate has)."""
    old = mlp.gate_proj
    new = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device, dtype=old.weight.dtype)
    new.weight = old.weight
    with torch.no_grad():
        new.bias.copy_((old.bias.detach() if old.bias is not None else 0.0) - b)
    new.bias.requires_grad_(False)
    mlp.gate_proj = new


def relufy(model: nn.Module, variant: str = "relu", *, shift: float | Sequence[float] = 0.0,
           tokens: torch.Tensor | None = None, sparsity: float | None = None) -> tuple[nn.Module, SparsityPlan]:
    """Swap the activation of every gated MLP of ``model`` (in place) and return it with its plan.

    ``shift`` (``shifted-relu`` only): one shift for all MLPs or one per MLP; ``sparsity`` with
    ``tokens`` calibrates a shift per MLP instead (that fraction of gate pre-activations below
    it). ``tokens`` (any variant): also measure each MLP's sparsity into ``plan.measured``.
    The plan has an ``exact`` rule on every MLP (and, for ``relu-gate``, threshold-0 input
    masks on gate and up).
    """
    if variant not in VARIANTS:
        raise ValueError(f"relufy: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if getattr(model, _MARK, None):
        raise ValueError(f"relufy: this model is already relufied ({getattr(model, _MARK)}); start from the dense one")
    if variant != "shifted-relu" and (sparsity is not None or (shift != 0.0 if isinstance(shift, (int, float))
                                                                 else any(s != 0 for s in shift))):
        raise ValueError(f"relufy: shift= and sparsity= are for variant 'shifted-relu', not {variant!r}")
    mlps = gated_mlps(model)
    if not mlps:
        raise ValueError("relufy: the model has no gated MLP (modules with gate_proj, up_proj, down_proj and act_fn, "
                         "as Llama, Qwen, Mistral and Gemma have)")
    shifts = _shifts(model, mlps, shift, tokens, sparsity) if variant == "shifted-relu" else []
    for i, m in enumerate(mlps):
        m.module.act_fn = nn.ReLU()
        if variant == "relu-gate":
            m.module.register_forward_pre_hook(_relu_input)
        elif variant == "shifted-relu":
            _fold_shift(m.module, shifts[i])
        elif variant == "drelu":
            if type(m.module.up_proj) is not nn.Linear:
                raise ValueError(f"relufy: {m.part('up_proj')} is a {type(m.module.up_proj).__name__}, not nn.Linear")
            m.module.up_proj.__class__ = ReLUOutLinear
    setattr(model, _MARK, variant)
    return model, exact_plan(model, variant, mlps, shifts, tokens)


def exact_plan(model: nn.Module, variant: str, mlps: list[GatedMLP], shifts: list[float],
               tokens: torch.Tensor | None = None) -> SparsityPlan:
    """The plan of a relufied model: exact zeros on every MLP (and its input for relu-gate)."""
    thresholds = {m.part(p): 0.0 for m in mlps for p in ("gate_proj", "up_proj")} if variant == "relu-gate" else {}
    info = {"variant": variant} | ({"shifts": shifts} if shifts else {})
    plan = SparsityPlan(thresholds=thresholds, method=f"relufy-{variant}", model=fingerprint(model), info=info,
                        rules=[ExactZeros([m.part("down_proj") for m in mlps])])
    if tokens is not None:
        plan.measured = mlp_sparsity(model, tokens)
        plan.target = sum(plan.measured.values()) / len(plan.measured)
    plan.validate(model)
    return plan


class ZeroCounter:
    """Counts exact zeros in each gated MLP's down-projection input while active (a context
    manager around any forward passes: perplexity, decoding)."""

    def __init__(self, model: nn.Module) -> None:
        self.mlps = gated_mlps(model)
        self.counts = {m.part("down_proj"): [0, 0] for m in self.mlps}
        self.handles: list = []

    def _hook(self, name):
        def hook(mod, args):
            h = args[0]
            self.counts[name][0] += int((h == 0).sum())
            self.counts[name][1] += h.numel()
        return hook

    def __enter__(self) -> ZeroCounter:
        self.handles = [m.module.down_proj.register_forward_pre_hook(self._hook(m.part("down_proj")))
                        for m in self.mlps]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def sparsity(self) -> dict[str, float]:
        return {k: z / max(n, 1) for k, (z, n) in self.counts.items()}

    def mean(self) -> float:
        sp = self.sparsity()
        return sum(sp.values()) / max(len(sp), 1)


def mlp_sparsity(model: nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """Fraction of exact zeros in each gated MLP's down-projection input over ``tokens``."""
    with ZeroCounter(model) as zc, torch.no_grad():
        model(tokens)
    return zc.sparsity()


def with_input_thresholds(plan: SparsityPlan, other: SparsityPlan) -> SparsityPlan:
    """``plan`` (a relufied model's exact plan) plus ``other``'s input thresholds on every linear
    the exact rule leaves dense: q/k/v, o, gate/up (TEAL on top of the activation's own zeros).

    ``other`` is calibrated on the relufied model itself (its inputs are what the thresholds
    see); its down-projection thresholds are dropped, since those inputs are already exact zeros.
    A new plan; neither argument changes.
    """
    if not isinstance(plan, SparsityPlan) or not isinstance(other, SparsityPlan):
        raise TypeError("with_input_thresholds takes two SparsityPlans")
    exact = plan.rule(ExactZeros)
    if exact is None:
        raise ValueError("with_input_thresholds: the first plan has no exact rule (make it with relufy)")
    if plan.model is not None and other.model is not None:
        plan.check_fingerprint(other.model)
    covered = exact.modules()
    own = plan.rule(InputThresholds)  # (the .thresholds property would add an empty rule to plan)
    own_values = dict(own.values) if own is not None else {}
    theirs = other.rule(InputThresholds)
    added = {k: v for k, v in (theirs.values if theirs is not None else {}).items()
             if k not in covered and k not in own_values}
    score = theirs.score if theirs is not None else "abs"
    if own_values and own.score != score:
        raise ValueError(f"with_input_thresholds: the plans score inputs differently ({own.score!r}, {score!r})")
    if not added:
        raise ValueError("with_input_thresholds: the second plan has no input threshold outside the exact rule")
    out = SparsityPlan(thresholds={**own_values, **added}, score=score, method=f"{plan.method}+{other.method}",
                       target=plan.target, measured=plan.measured, model=plan.model,
                       info={**plan.info, "input_thresholds_from": other.method, "input_thresholds_target": other.target},
                       rules=[copy.deepcopy(r) for k, r in plan.rules.items() if k != InputThresholds.kind])
    return out
