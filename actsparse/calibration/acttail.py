"""Tail-aware allocation (after ActTail): per-projection budgets from each input's heavy tail.

Each shared linear input (q/k/v, o, gate/up, down) gets a tail index alpha from the |x|
histogram the calibration pass already keeps: the Hill estimator over its largest ``tail``
fraction of entries, ``1 / alpha = E[log(|x| / u) | |x| > u]`` with u the (1 - tail) quantile.
A small alpha is a heavy tail: a few entries carry much of the input, and, as heavy-tailed
self-regularisation argues for weights, such inputs are treated as the more important ones.
Budgets are linear in log alpha between ``target - spread`` (heaviest tail) and
``target + spread`` (lightest), clipped to [0, 0.99], then shifted by one constant (found by
bisection) so that the parameter-weighted average over every masked linear is the target:
the same model-level sparsity as uniform TEAL, spent differently. Thresholds are then TEAL's,
one |x| quantile per projection at its budget.

The statistics are TEAL's (``abs``): no extra calibration pass, no block evaluations.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

import torch

from ..plan import InputThresholds
from .histogram import LogHistogram
from .method import CalibrationError, Made, Method, register_method
from .sites import groups

MAX_SPARSITY = 0.99


def hill_alpha(hist: LogHistogram, tail: float = 0.1) -> float:
    """Hill's tail index of the values in ``hist`` over their top ``tail`` fraction (nan if the
    tail is all zeros or empty). Within a bin, values sit at its geometric middle."""
    if not 0.0 < tail < 1.0:
        raise CalibrationError(f"tail must be in (0, 1), got {tail!r}")
    counts = hist.counts.double()
    total = float(counts.sum())
    if total == 0:
        return math.nan
    u = hist.quantile(1.0 - tail)
    if u <= 0.0:
        return math.nan
    idx = torch.arange(hist.bins, dtype=torch.int64) + hist.base
    lo = (torch.stack([idx, idx + 1]).to(torch.int32) << hist.shift).view(torch.float32).double()
    lo, hi = lo[0], lo[1]
    lo[0] = 0.0
    inside = (hi > u).double()  # bins reaching above the cutoff
    part = torch.where(lo >= u, torch.ones_like(lo), ((hi - u) / (hi - lo).clamp_min(1e-300)).clamp(0, 1))
    w = counts * inside * part
    start = torch.maximum(lo, torch.full_like(lo, u))
    mid = 0.5 * (torch.log(start.clamp_min(1e-300)) + torch.log(hi))
    mass = float(w.sum())
    if mass <= 0:
        return math.nan
    h = float((w * (mid - math.log(u))).sum()) / mass
    return 1.0 / h if h > 0 else math.inf


def tail_budgets(alphas: Mapping[str, float], params: Mapping[str, int], target: float,
                 spread: float) -> dict[str, float]:
    """Per-input sparsities: linear in log alpha over [target - spread, target + spread], shifted
    so that their parameter-weighted mean is ``target`` (within 1e-6, clipping permitting)."""
    keys = list(alphas)
    logs = {k: math.log(a) for k, a in alphas.items() if math.isfinite(a) and a > 0}
    if logs:
        mid = statistics.median(logs.values())
        lo, hi = min(logs.values()), max(logs.values())
    z = {}
    for k in keys:
        la = logs.get(k, mid if logs else 0.0)  # an unknown tail is treated as the median one
        z[k] = 0.0 if not logs or hi - lo < 1e-12 else 2.0 * (la - lo) / (hi - lo) - 1.0
    total = float(sum(params[k] for k in keys))

    def mean_at(c: float) -> tuple[float, dict[str, float]]:
        s = {k: min(MAX_SPARSITY, max(0.0, target + spread * z[k] + c)) for k in keys}
        return sum(s[k] * params[k] for k in keys) / total, s

    a, b = -1.0 - spread, 1.0 + spread
    for _ in range(100):  # the mean is non-decreasing in c
        c = 0.5 * (a + b)
        m, s = mean_at(c)
        if abs(m - target) < 1e-9:
            break
        a, b = (c, b) if m < target else (a, c)
    return s


@register_method
class ActTail(Method):
    name = "acttail"
    needs = ("abs",)
    options = {"spread": "how far budgets move from the target with the tail index (default 0.1)",
               "tail": "fraction of the largest |x| entries the Hill estimator reads (default 0.1)"}
    target_scope = "parameter-weighted sparsity over every masked linear"

    def make(self, cal, sparsity: float, spread: float = 0.1, tail: float = 0.1, **_: Any) -> Made:
        for name, v, hi in (("spread", spread, 1.0), ("tail", tail, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < hi:
                raise CalibrationError(f"{name} must be a number in (0, {hi:g}), got {v!r}")
        members = groups(cal.sites)
        alphas = {g: hill_alpha(cal.stats.abs[g], tail) for g in members}
        params = {g: sum(s.params for s in ms) for g, ms in members.items()}
        budgets = tail_budgets(alphas, params, sparsity, spread) if sparsity > 0 else {g: 0.0 for g in members}
        thresholds, measured = {}, {}
        for g, ms in members.items():
            hist = cal.stats.abs[g]
            t = hist.quantile(budgets[g]) if budgets[g] > 0 else 0.0
            for s in ms:
                thresholds[s.module] = t
                measured[s.module] = hist.cdf(t)
        info = {"acttail": {"spread": spread, "tail": tail,
                            "alpha": {g: (round(a, 4) if math.isfinite(a) else None) for g, a in alphas.items()},
                            "budgets": {g: round(b, 4) for g, b in budgets.items()}}}
        return Made([InputThresholds(thresholds)], measured, sparsity, info)
