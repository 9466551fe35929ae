"""Sparse plus low-rank (after R-Sparse): per linear, a TEAL mask and a rank-r SVD of the rest.

Each masked linear computes ``W (x*m) + A (B (x*(1-m)))`` with ``m = |x| > t`` and ``A B`` the
weight's best rank-r approximation (``A = U_r S_r``, ``B = V_r^T``). The sparsity and rank of
every linear are searched under one bytes budget: the target is an *effective* sparsity,
``1 - bytes read / dense bytes`` over every masked linear, with the low-rank factors' bytes
(``r * (in + out)`` per linear) counted against it.

Search: for every linear and every (sparsity, rank) of a small grid, the output error
``mean over tokens of ||(W - A B)(x*(1-m))||^2 / ||W x||^2`` on sampled calibration inputs of
the dense model (from the SVD, one product per sparsity: ``||(W - W_r) v||^2`` is the energy of
``S V^T v`` past its first r coordinates). Then one Lagrange multiplier trades error for bytes:
each linear takes the option minimising ``error + lambda * bytes``, and lambda is bisected
until the bytes fit the budget (a multiple-choice knapsack solved on its convex hull). Rank 0
options are TEAL thresholds, so the search may also just reallocate sparsity between linears.
"""

from __future__ import annotations

from typing import Any

import torch

from ..plan.rules.rsparse import LowRankSparse
from .method import CalibrationError, Made, Method, register_method
from .sites import SiteRecord, groups
from .statistics import no_cache, weight_in_out

SPARSITIES = tuple(round(0.05 * i, 2) for i in range(20))  # 0 .. 0.95
RANKS = (0, 8, 16, 32, 64, 128, 256)


@torch.no_grad()
def sample_inputs(model: torch.nn.Module, sites: list[SiteRecord], batches: list[torch.Tensor],
                  tokens: int) -> dict[str, torch.Tensor]:
    """About ``tokens`` rows [T, in] of each shared input, evenly strided over the batches."""
    total = sum(b.numel() for b in batches)
    stride = max(1, total // max(tokens, 1))
    mods = dict(model.named_modules())
    got: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(group: str):
        def pre(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            got.setdefault(group, []).append(x[::stride].float().clone())
        return pre

    for g in groups(sites):
        handles.append(mods[g].register_forward_pre_hook(hook(g)))
    try:
        for ids in batches:
            model(input_ids=ids.to(next(model.parameters()).device), **no_cache(model))
    finally:
        for h in handles:
            h.remove()
    return {g: torch.cat(xs) for g, xs in got.items()}


def option_errors(w: torch.Tensor, x: torch.Tensor, thresholds: list[float],
                  ranks: list[int]) -> torch.Tensor:
    """err[i, j]: mean relative output error of sparsity option i (threshold) with rank ranks[j].

    ``w`` [out, in], ``x`` [T, in]. Computed from the SVD; exact up to rounding.
    """
    _, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    x = x.double()
    ref = (x @ w.double().T).pow(2).sum(-1).clamp_min(1e-30)
    out = torch.empty(len(thresholds), len(ranks), dtype=torch.float64)
    for i, t in enumerate(thresholds):
        xc = torch.where(x.abs() > t, torch.zeros((), dtype=x.dtype), x) if t > 0 else x
        z2 = ((xc @ vh.T) * s).pow(2)
        cum = torch.cat([torch.zeros_like(z2[:, :1]), z2.cumsum(-1)], dim=1)
        tot = cum[:, -1]
        for j, r in enumerate(ranks):
            resid = (tot - cum[:, min(r, cum.shape[1] - 1)]).clamp_min(0) if t > 0 else torch.zeros_like(tot)
            out[i, j] = float((resid / ref).mean())
    return out


def choose(options: dict[str, list[tuple[float, float, Any]]], budget: float) -> dict[str, Any]:
    """Per linear, one option (bytes, error, payload) so that total bytes <= budget with about the
    least summed error: the minimiser of ``error + lam * bytes`` for the smallest lam that fits."""
    def pick(lam: float) -> tuple[float, dict[str, Any]]:
        total, chosen = 0.0, {}
        for name, opts in options.items():
            b, _, p = min(opts, key=lambda o: (o[1] + lam * o[0], o[0]))
            total += b
            chosen[name] = p
        return total, chosen

    lo, hi = 0.0, 1.0
    while pick(hi)[0] > budget:
        hi *= 4.0
        if hi > 1e30:
            raise CalibrationError("rsparse: no allocation fits the bytes budget; lower the target")
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if pick(mid)[0] > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)[1]


def site_options(cal, tokens: int) -> dict[str, list[tuple[float, float, Any]]]:
    """Per masked linear: its grid of (bytes, error, (sparsity, threshold, rank)), dense included."""
    samples = sample_inputs(cal.model, cal.sites, cal.batches, tokens)
    mods = dict(cal.model.named_modules())
    opts: dict[str, list[tuple[float, float, Any]]] = {}
    for g, members in groups(cal.sites).items():
        hist = cal.stats.abs[g]
        thresholds = [hist.quantile(s) if s > 0 else 0.0 for s in SPARSITIES]
        for site in members:
            w = weight_in_out(mods[site.module]).detach().t()  # [out, in]
            k, n = site.in_features, site.out_features
            ranks = [r for r in RANKS if r < min(k, n)]
            err = option_errors(w, samples[g], thresholds, ranks)
            here = []
            for i, s in enumerate(SPARSITIES):
                for j, r in enumerate(ranks):
                    if (s == 0 and r > 0) or (1 - s) * k * n + r * (k + n) >= k * n and s > 0:
                        continue
                    here.append(((1 - s) * k * n + r * (k + n), float(err[i, j]), (s, thresholds[i], r)))
            opts[site.module] = here
    return opts


def factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = U_r S_r [out, r], B = V_r^T [r, in]) of ``w`` [out, in], in fp32."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float().contiguous(), vh[:rank].float().contiguous()


@register_method
class RSparse(Method):
    name = "rsparse"
    needs = ("abs",)
    options = {"tokens": "calibration tokens the output errors are measured on (default 1024)"}
    target_scope = "effective sparsity: 1 - weight bytes read / dense bytes over every masked linear, " \
                   "low-rank factors counted"

    def make(self, cal, sparsity: float, tokens: int = 1024, **_: Any) -> Made:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise CalibrationError(f"tokens must be a positive integer, got {tokens!r}")
        key = ("rsparse", tokens)
        if key not in cal.cache:
            cal.cache[key] = site_options(cal, tokens)
        opts = cal.cache[key]
        sites = {s.module: s for s in cal.sites if s.module in opts}
        dense = float(sum(s.params for s in sites.values()))
        chosen = choose(opts, (1.0 - sparsity) * dense) if sparsity > 0 else \
            {m: (0.0, 0.0, 0) for m in opts}
        mods = dict(cal.model.named_modules())
        specs, tensors, measured, masked = {}, {}, {}, {}
        for m, (s, t, r) in chosen.items():
            site = sites[m]
            k, n = site.in_features, site.out_features
            frac = cal.stats.abs[site.group].cdf(t) if t > 0 else 0.0
            specs[m] = {"threshold": t, "sparsity": round(frac, 6), "rank": r, "in_features": k, "out_features": n}
            if r > 0:
                tensors[f"{m}.a"], tensors[f"{m}.b"] = factors(weight_in_out(mods[m]).detach().t(), r)
            measured[m] = max(0.0, 1.0 - ((1 - frac) * k * n + r * (k + n)) / (k * n))
            masked[m] = frac
        rule = LowRankSparse(specs, tensors)
        lowrank = rule.lowrank_params()
        info = {"rsparse": {"tokens": tokens, "sparsities": list(SPARSITIES), "ranks": list(RANKS),
                            "lowrank_fraction_of_dense": round(lowrank / dense, 6),
                            "mask_sparsity": round(sum(masked[m] * sites[m].params for m in masked) / dense, 6),
                            "ranked_linears": sum(1 for sp in specs.values() if sp["rank"] > 0),
                            "measured_is": "effective sparsity per linear (low-rank bytes counted)"}}
        return Made([rule], measured, sparsity, info)
