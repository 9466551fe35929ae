"""TEAL, uniform: every linear input gets the |x| quantile at the target sparsity.

Linears that share an input (q/k/v, gate/up) read one histogram, so they get one threshold.
With WINA scores (``wina=True``: ``|x_i| * ||W[:, i]||``) each linear has its own histogram and
threshold, and the plan's thresholds compare that score.
"""

from __future__ import annotations

from typing import Any

from ..plan import InputThresholds
from .method import Made, Method, register_method
from .sites import SiteRecord, groups
from .statistics import Statistics


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


WINA_OPTION = {"wina": "score |x_i| * ||W[:, i]|| (WINA) instead of |x_i|"}


@register_method
class Teal(Method):
    name = "teal"
    needs = ("abs",)
    options = WINA_OPTION
    target_scope = "every masked linear input"

    def needs_with(self, options):
        return ("wina",) if options.get("wina") else self.needs

    def make(self, cal, sparsity: float, wina: bool = False, **_: Any) -> Made:
        rules = wina_rules if wina else teal_rules
        thresholds, measured = rules(cal.sites, cal.stats, sparsity)
        return Made([InputThresholds(thresholds, "wina" if wina else "abs")], measured, sparsity)
