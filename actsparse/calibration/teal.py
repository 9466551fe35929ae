"""TEAL, uniform: every linear input gets the |x| quantile at the target sparsity.

Linears that share an input (q/k/v, gate/up) read one histogram, so they get one threshold.
With WINA scores (``|x_i| * ||W[:, i]||``) each linear has its own histogram and threshold.
"""

from __future__ import annotations

from .histogram import Statistics
from .sites import SiteRecord, groups


def teal_rules(sites: list[SiteRecord], stats: Statistics,
               sparsity: float) -> tuple[dict[str, float], dict[str, float]]:
    """(thresholds, measured sparsity on the calibration data) for every masked linear."""
    thresholds, measured = {}, {}
    for group, members in groups(sites).items():
        hist = stats.abs[group]
        t = hist.quantile(sparsity) if sparsity > 0 else 0.0
        for s in members:
            thresholds[s.module] = t
            measured[s.module] = hist.cdf(t)
    return thresholds, measured


def wina_rules(sites: list[SiteRecord], stats: Statistics,
               sparsity: float) -> tuple[dict[str, float], dict[str, float]]:
    """TEAL with WINA scores: per linear, the quantile of ``|x_i| * ||W[:, i]||`` at the target."""
    thresholds, measured = {}, {}
    for members in groups(sites).values():
        for s in members:
            hist = stats.wina[s.module]
            thresholds[s.module] = t = hist.quantile(sparsity) if sparsity > 0 else 0.0
            measured[s.module] = hist.cdf(t)
    return thresholds, measured
