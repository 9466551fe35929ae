"""TEAL's greedy allocation: per block, give sparsity to the linears where it hurts least.

Inside each decoder block, starting from dense, repeatedly raise the sparsity of the one
linear layer whose step costs the least block-output error, until the block's
parameter-weighted sparsity reaches the target (TEAL ``greedyopt.py``). Steps are weighted by
parameter count (a layer with fewer weights takes a larger step in its own sparsity, so each
step buys about the same parameter-weighted sparsity); small layers' steps are capped, so
candidates are compared by error increase per unit of parameter-weighted sparsity gained.

The error is ``mean over tokens of ||block(x) - dense block(x)|| / ||dense block(x)||`` on a
few calibration sequences, with the dense model's block inputs (captured once). Relative per
token, because the residual stream of an attention-sink token is 100x larger than the others'
and an absolute error would optimise for that one token (TEAL scores only the last 25% of
positions for a similar reason). Thresholds for a sparsity
come from the dense model's |x| histograms, as in TEAL. The path does not depend on the
target, so it is run once up to the largest target and any target reads its point off it.

Speed (CPU): candidates are evaluated lazily, as in lazy greedy for submodular objectives: a
candidate's cost measured under an earlier configuration is kept as an estimate and only the
cheapest one is re-measured; it is taken once its cost is current. That needs two to three
block evaluations per step instead of one per linear layer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from tqdm.auto import tqdm

from ..plan import InputThresholds
from .method import Made, Method, register_method
from .sites import SiteRecord, block_module, blocks
from .statistics import Statistics, no_cache
from .teal import WINA_OPTION


@dataclass
class GreedyPath:
    """One block's greedy path: after each step, the block sparsity and each unit's sparsity."""

    block: int | None
    units: list[str]
    groups: list[str]
    params: list[int]
    points: list[tuple[float, list[float], float]] = field(default_factory=list)  # (f, s, err)
    evaluations: int = 0

    def at(self, target: float) -> list[float]:
        """Per-unit sparsities at the first point reaching ``target`` (the last one if none)."""
        for f, s, _ in self.points:
            if f >= target - 1e-9:
                return s
        return self.points[-1][1]


def _capture_block_inputs(model, names: list[str], batches: list[torch.Tensor]) -> dict[str, list]:
    """The dense model's (args, kwargs) at each block's input, for every calibration batch."""
    mods = dict(model.named_modules())
    seen: dict[str, list] = {n: [] for n in names}
    handles = []

    def hook(name):
        def pre(mod, args, kwargs):
            seen[name].append((args, dict(kwargs)))
        return pre

    for n in names:
        handles.append(mods[n].register_forward_pre_hook(hook(n), with_kwargs=True))
    try:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids.to(next(model.parameters()).device), **no_cache(model))
    finally:
        for h in handles:
            h.remove()
    return seen


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def greedy_paths(model: torch.nn.Module, sites: list[SiteRecord], stats: Statistics,
                 batches: list[torch.Tensor], *, max_target: float, step: float = 0.02,
                 max_unit_step: float = 0.1, max_unit_sparsity: float = 0.99,
                 progress: bool = False, wina: bool = False) -> dict[int | None, GreedyPath]:
    """Run the greedy allocation of every block up to ``max_target`` block sparsity.

    ``step`` is the sparsity step of the block's largest linear; the others step by
    ``step * P_largest / P`` (parameter weighting), capped at ``max_unit_step``.
    ``wina``: masks and thresholds on ``|x_i| * ||W[:, i]||`` (``stats.wina``) instead of ``|x_i|``.
    """
    by_block = blocks(sites)
    names = {}
    for b, members in by_block.items():
        name = block_module(model, members)
        if name is None:
            raise ValueError(f"teal-greedy: cannot find the decoder block module of "
                             f"{members[0].module} (block {b}); use method='teal'")
        names[b] = name
    inputs = _capture_block_inputs(model, list(names.values()), batches)
    mods = dict(model.named_modules())
    paths: dict[int | None, GreedyPath] = {}
    for b in tqdm(list(by_block), desc="greedy allocation", disable=not progress, leave=False):
        members = by_block[b]
        path = GreedyPath(block=b, units=[s.module for s in members], groups=[s.group for s in members],
                          params=[s.params for s in members])
        paths[b] = path
        _run_block(path, mods[names[b]], [mods[u] for u in path.units], inputs[names[b]], stats,
                   max_target=max_target, step=step, max_unit_step=max_unit_step,
                   max_unit_sparsity=max_unit_sparsity, wina=wina)
    return paths


def _run_block(path: GreedyPath, block: torch.nn.Module, unit_mods: list[torch.nn.Module],
               inputs: list, stats: Statistics, *, max_target: float, step: float,
               max_unit_step: float, max_unit_sparsity: float, wina: bool = False) -> None:
    n = len(path.units)
    p = [float(x) for x in path.params]
    total = sum(p)
    dstep = [min(max_unit_step, step * max(p) / pi) for pi in p]
    thresholds = [0.0] * n
    quantiles: dict[tuple[str, float], float] = {}

    hists = [stats.wina[u] for u in path.units] if wina else [stats.abs[g] for g in path.groups]
    scales = [stats.col_norms[u] for u in path.units] if wina else [None] * n

    def t_of(i: int, s: float) -> float:
        key = (path.units[i] if wina else path.groups[i], round(s, 9))
        if key not in quantiles:
            quantiles[key] = 0.0 if s <= 0 else hists[i].quantile(min(s, 1.0))
        return quantiles[key]

    def mask_hook(i: int):
        def pre(mod, args):
            t = thresholds[i]
            if t <= 0:
                return None
            x = args[0]
            score = x.abs().float() if scales[i] is None else x.abs().float() * scales[i]
            return (torch.where(score > t, x, torch.zeros((), dtype=x.dtype)),) + tuple(args[1:])
        return pre

    handles = [m.register_forward_pre_hook(mask_hook(i)) for i, m in enumerate(unit_mods)]
    try:
        with torch.inference_mode():
            dense = [_first(block(*a, **k)).float() for a, k in inputs]
            ref_norms = [d.reshape(-1, d.shape[-1]).norm(dim=-1).clamp_min(1e-12) for d in dense]

            def error(s: list[float]) -> float:
                path.evaluations += 1
                for i in range(n):
                    thresholds[i] = t_of(i, s[i])
                err, count = 0.0, 0
                for (a, k), ref, rn in zip(inputs, dense, ref_norms):
                    diff = _first(block(*a, **k)).float() - ref
                    norms = diff.reshape(-1, diff.shape[-1]).norm(dim=-1) / rn
                    err += float(norms.sum())
                    count += norms.numel()
                return err / count

            s = [0.0] * n
            f, cur, version = 0.0, 0.0, 0
            path.points.append((0.0, list(s), 0.0))
            heap: list[tuple[float, int, int, float]] = []  # (cost per gain, unit, version, error)

            def push(i: int) -> None:
                nxt = min(max_unit_sparsity, s[i] + dstep[i])
                if nxt <= s[i] + 1e-12:
                    return  # this unit is at its cap
                cand = list(s)
                cand[i] = nxt
                err = error(cand)
                heapq.heappush(heap, ((err - cur) / ((nxt - s[i]) * p[i] / total), i, version, err))

            for i in range(n):
                push(i)
            while f < max_target - 1e-9 and heap:
                _, i, ver, err = heapq.heappop(heap)
                if ver != version:  # measured under an older configuration: re-measure
                    push(i)
                    continue
                s[i] = min(max_unit_sparsity, s[i] + dstep[i])
                f = sum(a * b for a, b in zip(s, p)) / total
                cur = err
                version += 1
                path.points.append((f, list(s), cur))
                push(i)  # the other entries are now stale and re-measured when popped
    finally:
        for h in handles:
            h.remove()


def greedy_for(cal, max_target: float, wina: bool = False) -> dict[int | None, GreedyPath]:
    """The greedy paths of a Calibrator up to ``max_target`` (computed once, reused for lower targets)."""
    hit = cal.cache.get(("greedy", wina))
    if hit is None or hit[0] < max_target:
        seqs = torch.cat(cal.batches)
        length = min(seqs.shape[1], 256)
        count = max(1, min(len(seqs), cal.greedy_tokens // length))
        paths = greedy_paths(cal.model, cal.sites, cal.stats, [seqs[:count, :length]], max_target=max_target,
                             step=cal.greedy_step, progress=cal.progress, wina=wina)
        cal.cache[("greedy", wina)] = hit = (max_target, paths, (count, length))
    return hit[1]


def _block_sparsity(path: GreedyPath, target: float) -> float:
    s = path.at(target)
    return round(sum(a * p for a, p in zip(s, path.params)) / sum(path.params), 6)


@register_method
class TealGreedy(Method):
    name = "teal-greedy"
    needs = ("abs",)
    options = WINA_OPTION
    target_scope = "parameter-weighted sparsity of each block's masked linears"

    def needs_with(self, options):
        return ("wina",) if options.get("wina") else self.needs

    def make(self, cal, sparsity: float, wina: bool = False, **_) -> Made:
        paths = greedy_for(cal, max(sparsity, 1e-9), wina=wina)
        count, length = cal.cache[("greedy", wina)][2]
        thresholds, measured = {}, {}
        for path in paths.values():
            for unit, group, s in zip(path.units, path.groups, path.at(sparsity)):
                hist = cal.stats.wina[unit] if wina else cal.stats.abs[group]
                thresholds[unit] = hist.quantile(s) if s > 0 else 0.0
                measured[unit] = hist.cdf(thresholds[unit])
        info = {"greedy": {"step": cal.greedy_step, "sequences": count, "seq_len": length,
                           "evaluations": sum(p.evaluations for p in paths.values()),
                           "block_sparsity": {str(b): _block_sparsity(p, sparsity) for b, p in paths.items()}}}
        return Made([InputThresholds(thresholds, "wina" if wina else "abs")], measured, sparsity, info)
