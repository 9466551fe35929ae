"""CATS: one threshold per MLP on |act(gate(x))|, at the target quantile.

The mask skips rows of up_proj and columns of down_proj (gate_proj still runs in full: its
output is what the mask is computed from). The rule is keyed by the down projection. For a
plain MLP (fc1 -> act -> fc2) the activation is the down input itself, so the rule is a
threshold on the down input and only fc2 is skipped.
"""

from __future__ import annotations

from ..plan import ActivationThresholds
from .method import MLP_SCOPE, Made, Method, register_method
from .sites import SiteRecord, mlp_downs, skipped_modules
from .statistics import Statistics


def cats_rules(sites: list[SiteRecord], stats: Statistics,
               sparsity: float) -> tuple[dict[str, float], dict[str, float]]:
    """(activation thresholds keyed by down projection, measured sparsity per skipped linear)."""
    thresholds, measured = {}, {}
    for s in mlp_downs(sites):
        hist = stats.act[s.module]
        t = hist.quantile(sparsity) if sparsity > 0 else 0.0
        thresholds[s.module] = t
        for m in skipped_modules(s):
            measured[m] = hist.cdf(t)
    return thresholds, measured


@register_method
class Cats(Method):
    name = "cats"
    needs = ("act",)
    target_scope = MLP_SCOPE

    def make(self, cal, sparsity: float, **_) -> Made:
        acts, measured = cats_rules(cal.sites, cal.stats, sparsity)
        return Made([ActivationThresholds(acts)], measured, sparsity)
