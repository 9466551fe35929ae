"""Head routers (Polar Sparsity): which attention heads matter for the current token.

Per decoder layer a linear router ``Linear(d, units)`` on the attention block's input scores
its units (KV groups, or single heads where the model has one KV head); the ``keep`` best run
and the rest output zero. Training, on calibration text run through the dense model:

* label: each unit's contribution to the block output, ``||W_o[:, unit] @ out_unit||`` per
  token (the norm of what o_proj adds from those heads), as a share of the token's total;
* loss: cross-entropy of the router's softmax against those shares (a ranking target, so one
  router serves every ``keep``); Adam with cosine decay, inputs standardised per channel (the
  scaling is folded into the weights afterwards, so it costs nothing at run time).

Allocation: how many units each layer keeps is chosen from calibration error, not by hand.
The error of a selection is the L2 norm of the dropped units' summed contribution,
``||sum_dropped c_u||``, relative to the residual stream entering the layer (default: what
the dropped heads change in the model's state) or to the block's own output, measured on
held-out tokens with the router's own selection (kept per token as the units' Gram matrix, so
any selection's error is a lookup). Starting from every unit, a unit is taken from the layer
where it raises the error least until the mean density reaches the target: layers that need
every head keep them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..plan import HeadRouting, SparsityPlan, fingerprint
from .data import token_batches
from .method import CalibrationError, Method, register_method
from .sites import SiteRecord, block_module, blocks, trace_sites
from .statistics import no_cache
from .training import train_minibatches

UNITS = ("group", "head")


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block of the model: the modules and head layout a router is made for."""

    layer: int | None
    q_proj: str  # the first linear reading the block input (q, or a fused qkv)
    o_proj: str
    in_features: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block: str | None = None  # the decoder layer holding it (its input is the residual stream)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def head_layout(model: torch.nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) from the model's config."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hq = getattr(cfg, "num_attention_heads", None)
    if not hq:
        raise CalibrationError("head routing needs the model's config.num_attention_heads")
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    return int(hq), int(hkv), int(d)


def attention_blocks(model: torch.nn.Module, sites: list[SiteRecord]) -> list[AttentionBlock]:
    """Every attention block the backend's site discovery finds, in graph order."""
    hq, hkv, hd = head_layout(model)
    out = []
    for layer, members in blocks(sites).items():
        ins = [s for s in members if s.role == "attn_in"]
        outs = [s for s in members if s.role == "attn_out"]
        if not ins or len(outs) != 1 or outs[0].in_features != hq * hd:
            continue
        q = next(s for s in ins if s.module == ins[0].group)
        out.append(AttentionBlock(layer, q.module, outs[0].module, q.in_features, hq, hkv, hd,
                                  block_module(model, members)))
    return out


@dataclass
class Router:
    """A trained router and how it did on held-out tokens."""

    w: torch.Tensor  # [units, d]
    b: torch.Tensor  # [units]
    losses: dict[str, float] = field(default_factory=dict)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.w, self.b)


def train_router(x: torch.Tensor, share: torch.Tensor, *, epochs: int = 30, lr: float = 1e-2,
                 batch_size: int = 1024, seed: int = 0) -> Router:
    """Cross-entropy of softmax(router(x)) against the units' contribution shares."""
    d, u = x.shape[1], share.shape[1]
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    w = (torch.randn(u, d, generator=g) / math.sqrt(d)).requires_grad_()
    b = torch.zeros(u).requires_grad_()
    first, last = train_minibatches(
        [w, b], lambda idx: -(share[idx] * F.log_softmax(F.linear(xs[idx], w, b), -1)).sum(-1).mean(), len(xs),
        epochs=epochs, batch_size=batch_size, lr=lr, generator=g)
    with torch.no_grad():  # fold the standardisation into the weights
        wf = w / std
        bf = b - wf @ mean
    return Router(wf.detach().contiguous(), bf.detach().contiguous(), {"first_epoch": first, "last_epoch": last})


def selection_error(gram: torch.Tensor, keep_mask: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Mean over tokens of ||sum of dropped contributions|| / ||sum of all||, from the Gram
    matrices [T, U, U] of the units' contributions and a bool [T, U] of the kept units; with
    ``scale`` [T], relative to it instead (the residual stream's norm)."""
    drop = (~keep_mask).float()
    num = torch.einsum("tu,tuv,tv->t", drop, gram, drop).clamp_min(0).sqrt()
    den = gram.sum((1, 2)).clamp_min(1e-30).sqrt() if scale is None else scale.clamp_min(1e-30)
    return float((num / den).mean())


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(scores, k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


class _Recorder:
    """Hooks on every block: the block input (router training) and the units' contributions."""

    def __init__(self, model, blks: list[AttentionBlock], hpu: int) -> None:
        self.blks, self.hpu = blks, hpu
        self.mods = dict(model.named_modules())
        self.x: dict[str, list[torch.Tensor]] = {b.o_proj: [] for b in blks}
        self.share: dict[str, list[torch.Tensor]] = {b.o_proj: [] for b in blks}
        self.gram: dict[str, list[torch.Tensor]] = {b.o_proj: [] for b in blks}
        self.residual: dict[str, list[torch.Tensor]] = {b.o_proj: [] for b in blks}

    def hooks(self):
        handles = []
        for blk in self.blks:
            if blk.block is not None:
                handles.append(self.mods[blk.block].register_forward_pre_hook(self._on_block(blk), with_kwargs=True))
            handles.append(self.mods[blk.q_proj].register_forward_pre_hook(self._on_input(blk)))
            handles.append(self.mods[blk.o_proj].register_forward_pre_hook(self._on_output(blk)))
        return handles

    def _on_block(self, blk):
        def fn(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            if isinstance(h, torch.Tensor):
                self.residual[blk.o_proj].append(h.detach().float().reshape(-1, h.shape[-1]).norm(dim=-1).cpu())
        return fn

    def _on_input(self, blk):
        def fn(mod, args):
            x = args[0].detach()
            self.x[blk.o_proj].append(x.reshape(-1, x.shape[-1]).to("cpu", torch.float32))
        return fn

    def _on_output(self, blk):
        w = self.mods[blk.o_proj].weight  # nn.Linear [out, Hq * D]
        w_in_out = w if type(self.mods[blk.o_proj]).__name__ == "Conv1D" else w.t()

        def fn(mod, args):
            h = args[0].detach().float().reshape(-1, blk.num_heads * blk.head_dim)  # [T, Hq * D]
            units = blk.num_heads // self.hpu
            hu = h.reshape(h.shape[0], units, self.hpu * blk.head_dim)  # [T, U, cols]
            wu = w_in_out.detach().float().reshape(units, self.hpu * blk.head_dim, -1)  # [U, cols, out]
            c = torch.einsum("tuc,uco->tuo", hu, wu)  # each unit's contribution to the block output
            norms = c.norm(dim=-1)
            self.share[blk.o_proj].append((norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)).cpu())
            self.gram[blk.o_proj].append(torch.einsum("tuo,tvo->tuv", c, c).cpu())
        return fn


def head_routing(model: torch.nn.Module, tokens_or_texts, density: float, tokenizer=None, *,
                 unit: str | None = None, token_budget: int = 8192, seq_len: int = 512, batch_size: int = 4,
                 holdout: float = 0.2, allocation: str = "greedy", error: str = "residual", seed: int = 0,
                 progress: bool = True) -> tuple[HeadRouting, dict[str, Any]]:
    """Trained head routers at mean head density ``density`` (kept units / units over layers).

    ``unit``: "group" (whole KV groups; the default where the model has several KV heads) or
    "head" (single query heads). ``allocation``: "greedy" (from calibration error, see the
    module docstring) or "uniform" (every layer at the density). ``error``: what the greedy
    allocation weighs, "residual" (the dropped contribution over the residual stream's norm: an
    attention block that adds little to the residual can lose more of it) or "attention" (over
    the block's own output).
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise CalibrationError(f"head density must be a number in (0, 1], got {density!r}")
    if allocation not in ("greedy", "uniform"):
        raise CalibrationError(f"allocation must be 'greedy' or 'uniform', got {allocation!r}")
    if error not in ("residual", "attention"):
        raise CalibrationError(f"error must be 'residual' or 'attention', got {error!r}")
    sites = trace_sites(model)
    blks = attention_blocks(model, sites)
    if not blks:
        raise CalibrationError("no attention block (q/k/v inputs and an output projection) found in the model's graph")
    hq, hkv = blks[0].num_heads, blks[0].num_kv_heads
    if unit is None:
        unit = "group" if hkv > 1 else "head"
    if unit not in UNITS:
        raise CalibrationError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    hpu = hq // hkv if unit == "group" else 1
    n_units = hq // hpu
    batches, data_info = token_batches(tokens_or_texts, tokenizer, token_budget=token_budget,
                                       batch_size=batch_size, seq_len=seq_len, seed=seed)
    rec = _Recorder(model, blks, hpu)
    handles = rec.hooks()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in tqdm(batches, desc="head routing: activations", disable=not progress, leave=False):
                model(input_ids=ids.to(device), **no_cache(model))
    finally:
        for h in handles:
            h.remove()

    routers: dict[str, Router] = {}
    errors: dict[str, list[float]] = {}
    costs: dict[str, list[float]] = {}  # what the allocation minimises
    oracle: dict[str, list[float]] = {}
    recall: dict[str, float] = {}
    for i, blk in enumerate(tqdm(blks, desc="head routing: train", disable=not progress, leave=False)):
        x = torch.cat(rec.x[blk.o_proj])
        share = torch.cat(rec.share[blk.o_proj])
        gram = torch.cat(rec.gram[blk.o_proj])
        res = torch.cat(rec.residual[blk.o_proj]) if error == "residual" and rec.residual[blk.o_proj] else None
        held = max(1, int(round(len(x) * holdout)))
        if held >= len(x):
            raise CalibrationError("too few calibration tokens to hold some out: give more text")
        k = len(x) - held
        r = routers[blk.o_proj] = train_router(x[:k], share[:k], seed=seed * 1000 + i)
        with torch.no_grad():
            scores = r.scores(x[k:])
        errors[blk.o_proj] = [selection_error(gram[k:], topk_mask(scores, j)) for j in range(1, n_units + 1)]
        costs[blk.o_proj] = errors[blk.o_proj] if res is None else \
            [selection_error(gram[k:], topk_mask(scores, j), res[k:]) for j in range(1, n_units + 1)]
        oracle[blk.o_proj] = [selection_error(gram[k:], topk_mask(share[k:], j)) for j in range(1, n_units + 1)]
        j = max(1, int(round(density * n_units)))
        hit = topk_mask(scores, j) & topk_mask(share[k:], j)
        recall[blk.o_proj] = float(hit.sum() / (j * held))

    keep = allocate(costs, n_units, density) if allocation == "greedy" else \
        {n: max(1, int(round(density * n_units))) for n in errors}
    specs, tensors = {}, {}
    for blk in blks:
        if keep[blk.o_proj] >= n_units:
            continue  # this layer keeps every unit: dense
        specs[blk.o_proj] = {"q_proj": blk.q_proj, "num_heads": hq, "num_kv_heads": hkv, "head_dim": blk.head_dim,
                             "heads_per_unit": hpu, "units": n_units, "keep": keep[blk.o_proj],
                             "in_features": blk.in_features}
        tensors[f"{blk.o_proj}.w"] = routers[blk.o_proj].w
        tensors[f"{blk.o_proj}.b"] = routers[blk.o_proj].b
    rule = HeadRouting(specs, tensors)
    info = {"target_density": density, "unit": unit, "heads_per_unit": hpu, "units": n_units,
            "allocation": allocation, "allocation_error": error, "tokens": data_info["tokens"], "held_out_fraction": holdout,
            "density": sum(keep.values()) / (n_units * len(keep)),
            "layers": {b.o_proj: {"keep": keep[b.o_proj], "error": round(errors[b.o_proj][keep[b.o_proj] - 1], 5),
                                  "oracle_error": round(oracle[b.o_proj][keep[b.o_proj] - 1], 5),
                                  "recall_at_target": round(recall[b.o_proj], 4)} for b in blks}}
    return rule, info


def allocate(errors: dict[str, list[float]], n_units: int, density: float) -> dict[str, int]:
    """Units kept per layer: greedily drop the unit whose loss raises its layer's error least,
    until the mean density is at most ``density`` (every layer keeps at least one)."""
    keep = {n: n_units for n in errors}
    budget = max(len(errors), int(math.floor(density * n_units * len(errors) + 1e-9)))
    total = n_units * len(errors)
    while total > budget:
        cands = [(errors[n][keep[n] - 2] - errors[n][keep[n] - 1], n) for n in keep if keep[n] > 1]
        if not cands:
            break
        _, n = min(cands)
        keep[n] -= 1
        total -= 1
    return keep


def add_head_routing(plan: SparsityPlan, model: torch.nn.Module, tokens_or_texts, density: float, tokenizer=None,
                     **kwargs: Any) -> SparsityPlan:
    """Add trained head routers at ``density`` to ``plan`` (any method's), in place."""
    rule, info = head_routing(model, tokens_or_texts, density, tokenizer, **kwargs)
    plan.add(rule)
    plan.info["heads"] = info
    if plan.model is None:
        plan.model = fingerprint(model)
    plan.validate(model)
    return plan


@register_method
class Polar(Method):
    """Head routing alone (no linear-input masks): the target is the head sparsity, or
    ``head_density`` directly."""

    name = "polar"
    options = {"unit": "group (whole KV groups) or head", "allocation": "greedy or uniform",
               "error": "what the greedy allocation weighs: residual (the dropped heads' share of the residual "
                        "stream, default) or attention (their share of the attention output)"}
    target_scope = "attention units (KV groups or heads) per token"
    from_statistics = False
    targets_heads = True

    def calibrate(self, model, tokens_or_texts, sparsity, tokenizer=None, *, calibrator_args, options):
        plan = SparsityPlan(method=self.name, target=sparsity, model=fingerprint(model))
        args = {k: calibrator_args[k] for k in ("seq_len", "seed", "progress", "batch_size") if k in calibrator_args}
        if "token_budget" in calibrator_args:
            args["token_budget"] = calibrator_args["token_budget"]
        plan.info = {"target_scope": self.target_scope}
        return add_head_routing(plan, model, tokens_or_texts, 1.0 - sparsity, tokenizer, **args, **options)

    def make(self, cal, sparsity, **options):
        raise CalibrationError("method 'polar' trains routers on its own pass over the data: use "
                               "actsparse.calibrate(model, data, method='polar', ...)")


def random_head_routing(model: torch.nn.Module, density: float, seed: int = 0, unit: str | None = None,
                        layers: list[int] | None = None) -> SparsityPlan:
    """A plan of random (untrained) head routers at ``density`` on every attention block: for tests
    and for speed measurements on random-weight models, where what is selected does not matter."""
    g = torch.Generator().manual_seed(seed)
    specs, tensors = {}, {}
    for i, blk in enumerate(attention_blocks(model, trace_sites(model))):
        if layers is not None and i not in layers:
            continue
        u = unit or ("group" if blk.num_kv_heads > 1 else "head")
        hpu = blk.group if u == "group" else 1
        units = blk.num_heads // hpu
        specs[blk.o_proj] = {"q_proj": blk.q_proj, "num_heads": blk.num_heads, "num_kv_heads": blk.num_kv_heads,
                             "head_dim": blk.head_dim, "heads_per_unit": hpu, "units": units,
                             "keep": max(1, min(units, round(density * units))), "in_features": blk.in_features}
        tensors[f"{blk.o_proj}.w"] = torch.randn(units, blk.in_features, generator=g)
        tensors[f"{blk.o_proj}.b"] = torch.randn(units, generator=g)
    plan = SparsityPlan(rules=[HeadRouting(specs, tensors)], method="manual", model=fingerprint(model))
    plan.validate(model)
    return plan
