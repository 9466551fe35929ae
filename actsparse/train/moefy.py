"""Dense-to-MoE conversion (D2DMoE, MoEfication): group each gated MLP's neurons into equal
experts, train a per-layer router that predicts each expert's output norm, and run only the
experts whose prediction exceeds a threshold (dynamic-k).

    model, plan = actsparse.moefy(model, experts=32, density=0.5, calibration=texts, tokenizer=tok)
    fast = torch.compile(model, backend="sparse", options={"plan": plan})

Steps, all on calibration text (the MLP inputs of the dense model, hooks, no gradients):

1. Clustering: balanced k-means (every expert gets exactly ``neurons / experts`` neurons) on
   ``features="coact"``, each neuron's ``|act(gate x) * up x|`` over a sample of calibration
   tokens (neurons that fire together share an expert), or ``features="down"``, the neuron's
   down-projection column (what it writes). Seeded: the same inputs give the same experts.
2. Permutation: gate/up rows and down columns are reordered so that each expert is one
   contiguous block of neurons (the dense model's function is unchanged), which is what the
   block-sparse kernel reads.
3. Router: ``router="linear"``, ``x W^T + b`` fitted by ridge regression in closed form
   (seconds), or ``"mlp"``, ``relu(x W1^T + b1) W2^T + b2`` trained with Adam on the MSE;
   target: each expert's output norm ``||down[:, block] @ h[block]||``.
4. Threshold: per layer, the ``1 - density`` quantile of the router's predictions on the
   calibration tokens, so that on them the mean fraction of experts run is ``density``.

The experts themselves are not fine-tuned here (``actsparse.train.moe_finetune`` fine-tunes
routers and experts afterwards, by self-distillation). The model is changed in place (permuted); the plan
(rule ``experts``) holds the routers and the permutations, and ``permute(model, plan)`` makes
the same expert layout from a fresh copy of the original weights.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.reference import ACTIVATIONS, activation, expert_mask, expert_mlp_reference, expert_scores
from ..plan import SparsityPlan, fingerprint
from ..plan.rules.experts import Experts
from .relufy import GatedMLP, ReLUOutLinear, gated_mlps

FEATURES = ("coact", "down")
ROUTERS = ("linear", "mlp")


@dataclass
class MoefyReport:
    """What the conversion did, for benchmarks: tokens, seconds, per-layer router fit."""

    tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    router_r2: list[float] = field(default_factory=list)  # fraction of the norms' variance explained
    density: list[float] = field(default_factory=list)  # measured on the calibration tokens
    scores: list[torch.Tensor] = field(default_factory=list, repr=False)  # router predictions [T, E] per MLP


# ------------------------------------------------------------------------------- checks

def _check(experts, density, features, router, hidden, tokens) -> None:
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ValueError(f"moefy: experts must be a positive integer, got {experts!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"moefy: density must be a number in (0, 1], got {density!r}")
    if features not in FEATURES:
        raise ValueError(f"moefy: features must be one of {', '.join(FEATURES)}, got {features!r}")
    if router not in ROUTERS:
        raise ValueError(f"moefy: router must be one of {', '.join(ROUTERS)}, got {router!r}")
    if router == "mlp" and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f"moefy: an 'mlp' router needs hidden >= 1, got {hidden!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 16:
        raise ValueError(f"moefy: token_budget must be an integer >= 16, got {tokens!r}")


def activation_name(mlp: nn.Module) -> str:
    """The name of an MLP's activation, found by evaluating it (HF wraps them in many classes)."""
    probe = torch.linspace(-4, 4, 33)
    with torch.no_grad():
        got = mlp.act_fn(probe)
    for name in ACTIVATIONS:
        if torch.allclose(got, activation(name, probe), atol=1e-5):
            return name
    raise ValueError(f"moefy: the MLP's activation {type(mlp.act_fn).__name__} is none of {', '.join(ACTIVATIONS)}")


def _mlps(model: nn.Module, experts: int) -> list[GatedMLP]:
    mlps = gated_mlps(model)
    if not mlps:
        raise ValueError("moefy: the model has no gated MLP (gate_proj, up_proj, down_proj, act_fn)")
    for m in mlps:
        mod = m.module
        if type(mod.up_proj) is ReLUOutLinear or type(mod.up_proj) is not nn.Linear:
            raise ValueError(f"moefy: {m.part('up_proj')} is a {type(mod.up_proj).__name__}; only plain "
                             "gated MLPs down(act(gate x) * up x) convert (not dReLU)")
        if mod._forward_pre_hooks:
            raise ValueError(f"moefy: {m.name} has forward pre-hooks (relu-gate?); only plain gated MLPs convert")
        n = mod.gate_proj.out_features
        if n % experts:
            raise ValueError(f"moefy: {m.name} has {n} neurons, which do not split into {experts} equal experts")
    return mlps


# ------------------------------------------------------------------------------- calibration

def mlp_inputs(model: nn.Module, mlps: list[GatedMLP], batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each MLP's input rows [T, d] (fp32, CPU) over the calibration batches, the dense model running."""
    seen: list[list[torch.Tensor]] = [[] for _ in mlps]

    def keep(i):
        def hook(mod, args):
            seen[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
        return hook

    handles = [m.module.register_forward_pre_hook(keep(i)) for i, m in enumerate(mlps)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                model(b.to(device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


def _hidden(mod: nn.Module, x: torch.Tensor, act: str) -> torch.Tensor:
    """``act(gate x) * up x`` in fp32 [T, n]."""
    w = mod.gate_proj
    g = F.linear(x, w.weight.float(), None if w.bias is None else w.bias.float())
    u = F.linear(x, mod.up_proj.weight.float(), None if mod.up_proj.bias is None else mod.up_proj.bias.float())
    return activation(act, g) * u


def expert_norms(mod: nn.Module, x: torch.Tensor, act: str, experts: int, chunk: int = 1024) -> torch.Tensor:
    """Each expert's output norm ``||down[:, block] @ h[block]||`` per token [T, E] (the router's target)."""
    n = mod.gate_proj.out_features
    bs = n // experts
    wd = mod.down_proj.weight.float()  # [d, n]
    out = []
    for i in range(0, x.shape[0], chunk):
        h = _hidden(mod, x[i:i + chunk], act)  # [t, n]
        y = torch.einsum("tek,dek->ted", h.view(-1, experts, bs), wd.view(-1, experts, bs))  # [t, E, d]
        out.append(y.norm(dim=-1))
    return torch.cat(out)


# ------------------------------------------------------------------------------- clustering

def _balanced_assign(dist: np.ndarray, cap: int) -> np.ndarray:
    """Each point to a centre, at most ``cap`` per centre: every round, each open centre takes
    the points that prefer it, closest first, up to its room; points it cannot take try again
    among the centres still open (at most k rounds)."""
    n, k = dist.shape
    labels = np.full(n, -1)
    fill = np.zeros(k, dtype=np.int64)
    while (labels < 0).any():
        free = np.flatnonzero(labels < 0)
        d = dist[free].copy()
        d[:, fill >= cap] = np.inf
        pref = d.argmin(1)
        for c in np.unique(pref):
            cand = free[pref == c]
            take = cand[np.argsort(dist[cand, c], kind="stable")[: cap - fill[c]]]
            labels[take] = c
            fill[c] += take.size
    return labels


def balanced_kmeans(features: torch.Tensor, k: int, *, seed: int = 0, iters: int = 25) -> torch.Tensor:
    """Labels [n] in 0..k-1 with exactly n/k points per cluster: k-means on unit-normalised
    rows (cosine), each assignment step a capacity-limited greedy (``_balanced_assign``).
    Deterministic for a seed."""
    n = features.shape[0]
    if n % k:
        raise ValueError(f"balanced_kmeans: {n} points do not split into {k} equal clusters")
    x = F.normalize(features.double(), dim=1).numpy()
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(n, size=k, replace=False)]
    labels = np.full(n, -1)
    for _ in range(iters):
        new = _balanced_assign(-(x @ centres.T), n // k)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            centres[c] = x[labels == c].mean(0)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True).clip(1e-12)
    return torch.from_numpy(labels).long()


def expert_permutation(labels: torch.Tensor) -> torch.Tensor:
    """The neuron order that makes each cluster a contiguous block (cluster order, then neuron order)."""
    return torch.sort(labels, stable=True).indices


def permute_mlp(mod: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the MLP's neurons (gate/up rows, down columns) in place: the same function."""
    with torch.no_grad():
        for lin in (mod.gate_proj, mod.up_proj):
            lin.weight.copy_(lin.weight[perm])
            if lin.bias is not None:
                lin.bias.copy_(lin.bias[perm])
        mod.down_proj.weight.copy_(mod.down_proj.weight[:, perm])


def permute(model: nn.Module, plan: SparsityPlan) -> nn.Module:
    """Apply an expert plan's permutations to a model with the original (unpermuted) weights, in place."""
    rule = plan.rule(Experts)
    if rule is None or rule.is_empty():
        raise ValueError("permute: the plan has no experts rule")
    for name in rule.specs:
        mlp = model.get_submodule(name.rsplit(".", 1)[0])
        permute_mlp(mlp, rule.perm(name).to(mlp.gate_proj.weight.device))
    return model


# ------------------------------------------------------------------------------- routers

def fit_linear_router(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> list[torch.Tensor]:
    """Ridge regression ``y ~ x W^T + b`` in float64, closed form: [W [E, d], b [E]]."""
    xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    gram = xa.T @ xa
    reg = ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    reg[-1, -1] = 0.0  # the bias is not shrunk
    sol = torch.linalg.solve(gram + reg, xa.T @ y.double())  # [d + 1, E]
    return [sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()]


def fit_mlp_router(x: torch.Tensor, y: torch.Tensor, hidden: int, *, steps: int = 300, lr: float = 3e-3,
                   batch: int = 1024, seed: int = 0) -> list[torch.Tensor]:
    """A two-layer router ``relu(x W1^T + b1) W2^T + b2`` trained with Adam on the MSE."""
    gen = torch.Generator().manual_seed(seed)
    d, e = x.shape[1], y.shape[1]
    w1 = (torch.randn(hidden, d, generator=gen) / d**0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(e, hidden, generator=gen) / hidden**0.5).requires_grad_()
    b2 = y.mean(0).clone().requires_grad_()
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=lr)
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        pred = F.linear(torch.relu(F.linear(x[idx], w1, b1)), w2, b2)
        loss = F.mse_loss(pred, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [t.detach().contiguous() for t in (w1, b1, w2, b2)]


def _r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(1e-12))


def calibrate_threshold(scores: torch.Tensor, density: float) -> float:
    """The cut that keeps a ``density`` fraction of the predictions (all of them at 1.0)."""
    if density >= 1.0:
        return -1e30
    flat = scores.flatten().double()
    if flat.numel() > 1 << 24:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
    return float(torch.quantile(flat, 1.0 - density))


# ------------------------------------------------------------------------------- the conversion

def moefy(model: nn.Module, experts: int = 32, density: float = 0.5, calibration=None, *, tokenizer=None,
          features: str = "coact", router: str = "linear", hidden: int = 64, token_budget: int = 4096,
          seq_len: int = 512, seed: int = 0, ridge: float = 1e-3, cluster_tokens: int = 1024,
          router_steps: int = 300, report: MoefyReport | None = None) -> tuple[nn.Module, SparsityPlan]:
    """Convert every gated MLP of ``model`` (in place) into ``experts`` routed experts; returns
    (model, plan). ``calibration``: texts (with ``tokenizer``) or token ids, as
    ``actsparse.calibrate`` takes them; at most ``token_budget`` tokens are used. See the
    module docstring for the steps; ``report`` (a MoefyReport) receives tokens and timings.
    """
    from ..calibration.data import token_batches

    _check(experts, density, features, router, hidden, token_budget)
    if calibration is None:
        raise ValueError("moefy: calibration= is required (texts with tokenizer=, or token ids): the router "
                         "learns from the MLP inputs of real text")
    mlps = _mlps(model, experts)
    report = report if report is not None else MoefyReport()
    t0 = time.perf_counter()
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2:  # rows of ids: keep their length
        seq_len = calibration.shape[1]
    batches, _ = token_batches(calibration, tokenizer, token_budget=token_budget, batch_size=1,
                               seq_len=min(seq_len, token_budget), seed=seed)
    xs = mlp_inputs(model, mlps, batches)
    report.tokens = int(xs[0].shape[0])
    report.seconds["activations"] = time.perf_counter() - t0
    specs, tensors = {}, {}
    t_cluster = t_router = 0.0
    for i, (m, x) in enumerate(zip(mlps, xs)):
        mod, act = m.module, activation_name(m.module)
        t1 = time.perf_counter()
        with torch.no_grad():
            if features == "coact":
                sample = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + i))
                           [:cluster_tokens]]
                feats = _hidden(mod, sample, act).abs().T  # [n, tokens]
            else:
                feats = mod.down_proj.weight.detach().float().T  # [n, d]
            perm = expert_permutation(balanced_kmeans(feats, experts, seed=seed + i))
            permute_mlp(mod, perm.to(mod.gate_proj.weight.device))
            y = expert_norms(mod, x, act, experts)
        t2 = time.perf_counter()
        t_cluster += t2 - t1
        if router == "linear":
            r = fit_linear_router(x, y, ridge)
        else:
            r = fit_mlp_router(x, y, hidden, steps=router_steps, seed=seed + i)
        with torch.no_grad():
            scores = expert_scores(x, r)
        thr = calibrate_threshold(scores, density)
        t_router += time.perf_counter() - t2
        report.router_r2.append(_r2(scores, y))
        report.scores.append(scores)
        report.density.append(float((scores > thr).float().mean()))
        down = m.part("down_proj")
        specs[down] = {"gate": m.part("gate_proj"), "up": m.part("up_proj"), "act": act, "experts": experts,
                       "in_features": mod.gate_proj.in_features, "neurons": mod.gate_proj.out_features,
                       "router": router, "hidden": hidden if router == "mlp" else 0, "threshold": thr,
                       "density": float(density)}
        parts = ("w1", "b1") if router == "linear" else ("w1", "b1", "w2", "b2")
        tensors.update({f"{down}.{p}": t for p, t in zip(parts, r)})
        tensors[f"{down}.perm"] = perm.long()
    report.seconds["clustering"] = t_cluster
    report.seconds["routers"] = t_router
    rule = Experts(specs, tensors)
    measured = {n: 1.0 - d for n, d in zip(specs, report.density)}
    plan = SparsityPlan(method=f"moefy-{features}-{router}", target=1.0 - float(density), model=fingerprint(model),
                        measured=measured, info={"experts": experts, "density": float(density), "features": features,
                                                 "router": router, "calibration_tokens": report.tokens,
                                                 "seed": seed}, rules=[rule])
    plan.validate(model)
    return model, plan


def retarget(plan: SparsityPlan, report: MoefyReport, density: float) -> SparsityPlan:
    """The same experts and routers at another density: thresholds recalibrated on the router
    predictions ``moefy`` kept in ``report`` (no new pass over the calibration text)."""
    _check(1, density, "coact", "linear", 1, 16)
    rule = plan.rule(Experts)
    if rule is None or len(report.scores) != len(rule.specs):
        raise ValueError("retarget: needs the plan and the report of one moefy call")
    specs = {}
    measured = {}
    for (name, sp), scores in zip(rule.specs.items(), report.scores):
        thr = calibrate_threshold(scores, density)
        specs[name] = dict(sp, threshold=thr, density=float(density))
        measured[name] = 1.0 - float((scores > thr).float().mean())
    out = SparsityPlan(method=plan.method, target=1.0 - float(density), model=plan.model, measured=measured,
                       info=dict(plan.info, density=float(density)), rules=[Experts(specs, dict(rule.weights))])
    return out


# ------------------------------------------------------------------------------- eager reference

@contextmanager
def routed(model: nn.Module, plan: SparsityPlan, record: dict[str, list[torch.Tensor]] | None = None
           ) -> Iterator[nn.Module]:
    """Run ``model`` eagerly with the plan's experts: each MLP computes the reference
    ``expert_mlp`` on the experts its router selects (the semantics the backend compiles).
    ``record``: a dict that receives each MLP's expert masks [T, E], call by call."""
    rule = plan.rule(Experts)
    if rule is None or rule.is_empty():
        raise ValueError("routed: the plan has no experts rule")
    def make(name, sp, mod):
        dev = mod.gate_proj.weight.device
        r = [t.to(dev) for t in rule.router(name)]

        def forward(x):
            mask = expert_mask(x, r, sp["threshold"])
            if record is not None:
                record.setdefault(name, []).append(mask.reshape(-1, mask.shape[-1]).cpu())
            return expert_mlp_reference(x, mask, mod.gate_proj.weight, mod.up_proj.weight, mod.down_proj.weight,
                                        mod.gate_proj.bias, mod.up_proj.bias, mod.down_proj.bias, sp["act"])
        return forward

    with patched_mlps(model, rule.specs, make):
        yield model


@contextmanager
def patched_mlps(model: nn.Module, specs: dict[str, dict], make) -> Iterator[nn.Module]:
    """Replace the forward of the MLP that owns each down projection named in ``specs`` by
    ``make(name, spec, mlp)`` for as long as the context lasts."""
    patched = []
    try:
        for name, sp in specs.items():
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            mod.forward = make(name, sp, mod)
            patched.append(mod)
        yield model
    finally:
        for mod in patched:
            del mod.forward


__all__ = ["FEATURES", "ROUTERS", "MoefyReport", "activation_name", "balanced_kmeans", "calibrate_threshold",
           "expert_norms", "expert_permutation", "fit_linear_router", "fit_mlp_router", "mlp_inputs", "moefy",
           "permute", "permute_mlp", "retarget", "routed"]
