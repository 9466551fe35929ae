"""Fine-tune a dense-to-MoE model (``actsparse.moefy``) towards its dense teacher, with the
routing of inference in the loop.

    model, plan = actsparse.moefy(model, experts=128, density=0.667, calibration=texts, tokenizer=tok)
    plan, result = finetune_moe(model, plan, teacher, MoeFinetuneConfig(train="router"), calibration=ids)
    save_finetuned(model, plan, "moe.plan.json")  # routers in the plan's sidecar, LoRA in a file
    # later: model, plan = load_finetuned(fresh_base_model, "moe.plan.json")

The fitted router predicts each expert's output *norm*; what matters is each expert's effect on
the logits. Training data is self-distillation (``distill.sample_sequences``: sequences sampled
from the dense teacher, seeded), the loss KL(teacher || student) on next-token distributions.

Recipes (``train=``):

* ``"router"``: only the routers learn. The forward runs hard selection exactly as at
  inference (each expert on or off, output unscaled), but the backward uses a straight-through
  surrogate: the mask's gradient flows into ``sigmoid((score - threshold) / tau)``. Every
  expert's output is computed during training, so ``dKL/dmask_e`` is the first-order change in
  the KL if expert e were switched (on for a skipped one, off for a run one): the router learns
  to rank experts by what they do to the logits, not by their norm. No scaling gate is added,
  so the plan format and the kernels stay as they are.
* ``"lora"``: LoRA adapters on the MLP linears (``lora.add_lora``) learn while the routers stay
  fixed: the experts adapt to their routing. Merged into the weights afterwards, so the bytes
  read per token do not change.
* ``"both"``: routers and adapters together.

During training each layer's threshold is the ``1 - density`` quantile of its scores on the
current batch, so the model always trains at the density it will run at. Afterwards the
thresholds are calibrated again (``recalibrate``) on calibration tokens in one routed pass, layer
after layer (layer l's inputs already follow the new thresholds of layers < l), so the fraction
of experts run, hence the MLP bytes, stays at the target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..ops.reference import expert_scores
from ..plan import SparsityPlan
from ..plan.rules.experts import Experts
from .distill import (kl_teacher_student, optimizer_step, report_step, sample_sequences, shuffled_batches,
                      warmup_schedule)
from .lora import add_lora, load_adapters, lora_modules, lora_parameters, merge_lora, save_adapters
from .moefy import calibrate_threshold, patched_mlps, permute

RECIPES = ("router", "lora", "both")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MoeFinetuneConfig:
    """One fine-tune's settings; ``check`` validates every field."""

    train: str = "router"  # one of RECIPES
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    samples: int = 64  # training sequences sampled from the teacher (cycled through)
    held_out: int = 8  # further sampled sequences, only to measure the KL before and after
    density: float | None = None  # fraction of experts to run (None: the plan's)
    router_lr: float = 3e-3  # Adam step relative to each router tensor's RMS
    lr: float = 1e-3  # LoRA learning rate
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = MLP_TARGETS
    tau: float = 0.25  # surrogate width, as a fraction of the layer's score spread (std)
    temperature: float = 1.0  # sampling temperature of the teacher's sequences
    top_k: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    max_seconds: float = 0.0  # stop after this much training time (0: run every step)

    def check(self) -> MoeFinetuneConfig:
        if self.train not in RECIPES:
            raise ValueError(f"finetune_moe: train must be one of {', '.join(RECIPES)}, got {self.train!r}")
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("samples", 1), ("held_out", 0),
                          ("rank", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"finetune_moe: {name} must be an integer >= {low}, got {v!r}")
        for name, positive in (("router_lr", True), ("lr", True), ("alpha", True), ("tau", True),
                               ("temperature", True), ("grad_clip", True), ("max_seconds", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not (v > 0 if positive else v >= 0):
                raise ValueError(f"finetune_moe: {name} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {v!r}")
        d = self.density
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0):
            raise ValueError(f"finetune_moe: density must be a number in (0, 1] or None, got {d!r}")
        for name in ("top_k", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (name == "top_k" and v < 0):
                raise ValueError(f"finetune_moe: {name} must be an integer{' >= 0' if name == 'top_k' else ''}, "
                                 f"got {v!r}")
        if isinstance(self.targets, str) or not self.targets or not set(self.targets) <= set(MLP_TARGETS):
            raise ValueError(f"finetune_moe: targets must be a non-empty subset of {', '.join(MLP_TARGETS)} (the "
                             f"experts' linears), got {self.targets!r}")
        self.targets = tuple(self.targets)
        return self

    @property
    def routers(self) -> bool:
        return self.train in ("router", "both")

    @property
    def lora(self) -> bool:
        return self.train in ("lora", "both")


@dataclass
class MoeFinetuneResult:
    kl: list[float] = field(default_factory=list)  # training KL, step by step
    held_out_kl_before: float | None = None  # the plan as given
    held_out_kl_after: float | None = None  # the returned plan (recalibrated thresholds)
    tokens: int = 0  # training tokens seen
    steps: int = 0
    seconds: float = 0.0  # training loop
    sample_seconds: float = 0.0  # sampling the teacher's sequences
    recalibration_seconds: float = 0.0
    density: list[float] = field(default_factory=list)  # per MLP, on the recalibration tokens
    config: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- routing

class _Routing:
    """Per MLP: router tensors and threshold; ``quantile`` makes each call's threshold the
    ``1 - density`` quantile of that call's scores (and records it)."""

    def __init__(self, rule: Experts, density: float, tau: float, trainable: bool) -> None:
        self.specs = rule.specs
        self.routers = {n: [nn.Parameter(t.detach().float().clone(), requires_grad=trainable)
                            for t in rule.router(n)] for n in rule.specs}
        self.threshold = {n: float(sp["threshold"]) for n, sp in rule.specs.items()}
        self.density, self.tau = density, tau
        self.quantile = True
        self.straight_through = trainable
        self.seen_thresholds: dict[str, float] = {}
        self.seen_density: dict[str, float] = {}

    def parameters(self) -> list[nn.Parameter]:
        return [p for r in self.routers.values() for p in r]

    def mask(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Float expert mask [..., E]: 0/1 forward; with straight-through, the sigmoid's gradient."""
        r = [p.to(x.device) for p in self.routers[name]]
        s = expert_scores(x, r)
        if self.quantile:
            thr = calibrate_threshold(s.detach().reshape(-1, s.shape[-1]), self.density)
            self.seen_thresholds[name] = thr
        else:
            thr = self.threshold[name]
        hard = (s > thr).float()
        self.seen_density[name] = float(hard.detach().mean())
        if not (self.straight_through and torch.is_grad_enabled()):
            return hard
        width = self.tau * s.detach().std().clamp_min(1e-6)
        soft = torch.sigmoid((s - thr) / width)
        return hard + soft - soft.detach()


@contextmanager
def _routed_training(model: nn.Module, routing: _Routing) -> Iterator[nn.Module]:
    """Each expert MLP computes ``down(mask_neurons * act(gate x) * up x)`` through its modules
    (so LoRA parametrizations apply), all experts computed, the unselected ones zeroed."""
    def make(name, sp, mod):
        block = sp["neurons"] // sp["experts"]

        def forward(x):
            m = routing.mask(name, x).repeat_interleave(block, dim=-1)
            h = mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x)
            return mod.down_proj(h * m.to(h.dtype))
        return forward

    with patched_mlps(model, routing.specs, make):
        yield model


def _plan_with(plan: SparsityPlan, routing: _Routing, thresholds: dict[str, float], density: float,
               measured: dict[str, float], info: dict[str, Any]) -> SparsityPlan:
    rule = plan.rule(Experts)
    weights = dict(rule.weights)
    for name, sp in rule.specs.items():
        parts = ("w1", "b1") if sp["router"] == "linear" else ("w1", "b1", "w2", "b2")
        for p, t in zip(parts, routing.routers[name]):
            weights[f"{name}.{p}"] = t.detach().float().cpu().contiguous()
    specs = {n: dict(sp, threshold=thresholds[n], density=float(density)) for n, sp in rule.specs.items()}
    return SparsityPlan(method=plan.method, target=1.0 - float(density), model=plan.model,
                        measured={n: 1.0 - d for n, d in measured.items()}, info={**plan.info, **info},
                        rules=[Experts(specs, weights)])


def _decoder(model: nn.Module) -> nn.Module:
    """The model without its LM head where HF offers one (a calibration pass needs no logits)."""
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else model


def _recalibrate(model: nn.Module, routing: _Routing, tokens: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    routing.quantile, routing.seen_thresholds, routing.seen_density = True, {}, {}
    device = next(model.parameters()).device
    with torch.no_grad(), _routed_training(model, routing):
        _decoder(model)(tokens.to(device))
    return dict(routing.seen_thresholds), dict(routing.seen_density)


def recalibrate(model: nn.Module, plan: SparsityPlan, tokens: torch.Tensor, density: float | None = None
                ) -> SparsityPlan:
    """The plan with thresholds calibrated again so that a ``density`` fraction of experts runs
    on ``tokens`` [N, T]: one routed pass, each layer's threshold the quantile of its scores
    with the earlier layers already at their new thresholds."""
    rule = _rule(plan)
    density = _density(plan, density)
    routing = _Routing(rule, density, 1.0, trainable=False)
    thr, measured = _recalibrate(model, routing, _ids(tokens, "recalibrate"))
    return _plan_with(plan, routing, thr, density, measured, {"density": float(density)})


# ------------------------------------------------------------------------------- the fine-tune

def _rule(plan: Any) -> Experts:
    rule = plan.rule(Experts) if isinstance(plan, SparsityPlan) else None
    if rule is None or rule.is_empty():
        raise ValueError("finetune_moe: plan must be a SparsityPlan with an experts rule (from actsparse.moefy)")
    return rule


def _density(plan: SparsityPlan, density: float | None) -> float:
    if density is not None:
        return float(density)
    d = plan.info.get("density")
    if not isinstance(d, (int, float)):
        raise ValueError("finetune_moe: the plan records no density; pass config.density")
    return float(d)


def _ids(tokens: Any, where: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) \
            or tokens.numel() == 0:
        raise ValueError(f"{where}: tokens must be a non-empty integer tensor [sequences, length], got "
                         f"{type(tokens).__name__}{list(tokens.shape) if isinstance(tokens, torch.Tensor) else ''}")
    return tokens.long()


def _held_out_kl(model, teacher, routing: _Routing, seqs: torch.Tensor, batch: int) -> float | None:
    if len(seqs) == 0:
        return None
    routing.quantile = False
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            ids = seqs[i:i + batch]
            t = teacher(ids).logits
            with _routed_training(model, routing):
                s = model(ids).logits
            total += float(kl_teacher_student(t, s)) * len(ids)
    return total / len(seqs)


def finetune_moe(model: nn.Module, plan: SparsityPlan, teacher: nn.Module | None = None,
                 config: MoeFinetuneConfig | None = None, *, sequences: torch.Tensor | None = None,
                 held_out: torch.Tensor | None = None, calibration: torch.Tensor | None = None,
                 progress: bool | Callable[[int, dict], None] = False) -> tuple[SparsityPlan, MoeFinetuneResult]:
    """Fine-tune the moefied ``model`` (in place: LoRA adapters are added, not merged) and its
    ``plan``'s routers towards the dense ``teacher``; returns (new plan, result).

    ``teacher``: the dense model (frozen); for ``train="router"`` it may be None, then ``model``
    itself without routing is the teacher (its weights do not change). ``sequences`` [N, T]:
    training tokens (default: ``config.samples`` sampled from the teacher, and ``config.held_out``
    more as ``held_out``, the sequences the KL is measured on before and after). ``calibration``
    [N, T]: the tokens the thresholds are recalibrated on afterwards (default: the training
    sequences). ``progress``: True for a progress bar, or a callback ``(step, values)``.
    """
    cfg = (config or MoeFinetuneConfig()).check()
    rule = _rule(plan)
    density = _density(plan, cfg.density)
    if cfg.lora and teacher is None:
        raise ValueError("finetune_moe: train='lora'/'both' changes the model's weights, so it needs the dense "
                         "teacher (a copy of the model before fine-tuning, e.g. copy.deepcopy before moefy)")
    if cfg.lora and lora_modules(model):
        raise ValueError("finetune_moe: the model already has LoRA adapters (merge or remove them first)")
    res = MoeFinetuneResult(config=asdict(cfg))
    routing = _Routing(rule, density, cfg.tau, trainable=cfg.routers)
    dense_teacher = teacher if teacher is not None else model
    dense_teacher.eval()
    model.requires_grad_(False)
    if teacher is not None:
        teacher.requires_grad_(False)

    t0 = time.perf_counter()
    if sequences is None:
        sequences = sample_sequences(dense_teacher, cfg.samples + cfg.held_out, cfg.seq_len, seed=cfg.seed,
                                     temperature=cfg.temperature, top_k=cfg.top_k)
        train_seqs, held = sequences[:cfg.samples], sequences[cfg.samples:]
    else:
        train_seqs = _ids(sequences, "finetune_moe: sequences")
        held = train_seqs[:0] if held_out is None else _ids(held_out, "finetune_moe: held_out")
    res.sample_seconds = time.perf_counter() - t0
    calibration = train_seqs if calibration is None else _ids(calibration, "finetune_moe: calibration")
    res.held_out_kl_before = _held_out_kl(model, dense_teacher, routing, held, cfg.batch_size)

    groups = []
    if cfg.routers:
        groups += [{"params": [p], "lr": cfg.router_lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))}
                   for p in routing.parameters()]
    if cfg.lora:
        add_lora(model, cfg.targets, cfg.rank, cfg.alpha, seed=cfg.seed)
        groups.append({"params": lora_parameters(model), "lr": cfg.lr})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups)
    sched = warmup_schedule(opt, cfg.steps)
    bar = _bar(cfg.steps) if progress is True else None
    routing.quantile = True
    t1 = time.perf_counter()
    try:
        for step, ids in enumerate(shuffled_batches(train_seqs, cfg.batch_size, cfg.steps, cfg.seed)):
            with torch.no_grad():
                t_logits = dense_teacher(ids).logits
            model.train()
            with _routed_training(model, routing):
                kl = kl_teacher_student(t_logits, model(ids).logits)
            optimizer_step(kl, opt, sched, params, cfg.grad_clip)
            res.kl.append(float(kl.detach()))
            res.tokens += ids.numel()
            res.steps += 1
            report_step(bar, progress, step, {"kl": res.kl[-1]})
            if cfg.max_seconds and time.perf_counter() - t1 > cfg.max_seconds:
                break
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    res.seconds = time.perf_counter() - t1

    t2 = time.perf_counter()
    thr, measured = _recalibrate(model, routing, calibration)
    res.recalibration_seconds = time.perf_counter() - t2
    res.density = [measured[n] for n in rule.specs]
    routing.threshold = thr
    res.held_out_kl_after = _held_out_kl(model, dense_teacher, routing, held, cfg.batch_size)
    info = {"density": float(density),
            "finetune": {"train": cfg.train, "steps": res.steps, "tokens": res.tokens, "seed": cfg.seed,
                         "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets)} if cfg.lora
                         else None}}
    return _plan_with(plan, routing, thr, density, measured, info), res


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="moe fine-tune", unit="step")


# ------------------------------------------------------------------------------- files

def adapters_path(plan_path: str | Path) -> Path:
    """Where ``save_finetuned`` puts the LoRA adapters of a plan file: beside it."""
    p = Path(plan_path)
    stem = p.name[:-len(".json")] if p.name.endswith(".json") else p.name
    return p.with_name(stem + ".adapters.safetensors")


def save_finetuned(model: nn.Module, plan: SparsityPlan, path: str | Path) -> dict[str, Path]:
    """The plan (JSON, routers and permutations in its safetensors sidecar) and, when the
    model carries LoRA adapters, those (safetensors, ``adapters_path``). Never pickle."""
    out = {"plan": Path(plan.save(path))}
    if lora_modules(model):
        ap = adapters_path(path)
        save_adapters(model, ap, info={"moefy_plan": Path(path).name})
        out["adapters"] = ap
    return out


def load_finetuned(model: nn.Module, path: str | Path, merge: bool = True) -> tuple[nn.Module, SparsityPlan]:
    """A fine-tuned MoE model from a fresh copy of the original dense ``model`` (in place) and
    the files of ``save_finetuned``: the plan's permutation, then the adapters if any (merged
    into the weights unless ``merge=False``). Returns (model, plan)."""
    plan = SparsityPlan.load(path, model)
    _rule(plan)
    permute(model, plan)
    ap = adapters_path(path)
    if ap.is_file():
        load_adapters(model, ap)
        if merge:
            merge_lora(model)
    return model, plan


__all__ = ["MLP_TARGETS", "RECIPES", "MoeFinetuneConfig", "MoeFinetuneResult", "adapters_path", "finetune_moe",
           "load_finetuned", "recalibrate", "save_finetuned"]
