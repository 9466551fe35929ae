"""Statistical top-k: no calibration, a per-token cutoff ``multiplier * mean|x|``.

The plan is ``SparsityPlan.statistical`` (see ``StatTopK`` for the assumed shapes); calibration
data only measures the sparsity it really gives, which departs from the target where site
inputs do not have the assumed shape.
"""

from __future__ import annotations

from ..plan import StatTopK
from .histogram import Statistics
from .sites import SiteRecord, groups


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
