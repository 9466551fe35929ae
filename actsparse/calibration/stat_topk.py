"""Statistical top-k: no calibration, a per-token cutoff ``multiplier * mean|x|``.

The rule is ``plan.StatTopK`` (see it for the assumed shapes); calibration data only measures
the sparsity it really gives, which departs from the target where site inputs do not have the
assumed shape.
"""

from __future__ import annotations

from ..plan import StatTopK
from .method import Made, Method, register_method
from .sites import SiteRecord, groups
from .statistics import Statistics


def stat_topk_measured(sites: list[SiteRecord], stats: Statistics, rule: StatTopK) -> dict[str, float]:
    """Sparsity per masked linear: the fraction of |x| / mean|x| at or below the multiplier."""
    measured = {}
    z = rule.multiplier if rule.sparsity > 0 else 0.0
    for group, members in groups(sites).items():
        frac = stats.rel[group].cdf(z)
        for s in members:
            if s.role in rule.roles:
                measured[s.module] = frac
    return measured


@register_method
class StatTopKMethod(Method):
    name = "stat-topk"
    needs = ("rel",)
    target_scope = "every masked linear input"

    def make(self, cal, sparsity: float, **_) -> Made:
        rule = StatTopK(sparsity)
        return Made([rule], stat_topk_measured(cal.sites, cal.stats, rule), sparsity)
