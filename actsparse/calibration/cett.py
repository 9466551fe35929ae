"""CETT: MLP thresholds chosen by output error, not by sparsity ("ReLU^2 Wins", ProSparse).

A neuron's contribution to the MLP output is ``n_i = a_i * W_down[:, i]`` (``a`` the down
projection's input). Masking ``|act(gate)| <= e`` drops the neurons below ``e``; CETT is
``||sum of dropped n_i|| / ||MLP output||`` per token, averaged over tokens. Each MLP gets the
largest ``e`` whose CETT stays within the budget, so layers that tolerate more get sparser.

Per sampled token the neurons are sorted by |act| once and the norms of the prefix sums of
their contributions are kept: the CETT of any threshold is then a lookup (searchsorted), so
the budget search and the budget-for-a-target-sparsity search cost no further model runs.
"""

from __future__ import annotations

from ..plan import ActivationThresholds
from .cett_sample import CettSample
from .histogram import LogHistogram
from .method import MLP_SCOPE, CalibrationError, Made, Method, check_sparsity, register_method
from .sites import mlp_downs, skipped_modules


def cett_thresholds(samples: dict[str, CettSample], budget: float) -> dict[str, tuple[float, float]]:
    """Per MLP (keyed by its down projection): (threshold, CETT on the sampled tokens)."""
    return {name: s.threshold(budget) for name, s in samples.items()}


def budget_for_sparsity(samples: dict[str, CettSample], hists: dict[str, LogHistogram],
                        weights: dict[str, float], target: float, iters: int = 40) -> float:
    """The smallest error budget whose thresholds reach ``target`` neuron sparsity, averaged over
    MLPs with ``weights`` (their up + down parameter counts), measured by the |act| histograms.

    Sparsity is non-decreasing in the budget (each MLP's threshold is), so bisection finds it.
    """
    def sparsity(b: float) -> float:
        th = cett_thresholds(samples, b)
        tot = sum(weights.values())
        return sum(weights[n] * hists[n].cdf(th[n][0]) for n in samples) / tot

    lo, hi = 0.0, 1.0
    while sparsity(hi) < target and hi < 64:
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if sparsity(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


@register_method
class Cett(Method):
    name = "cett"
    needs = ("act", "cett")
    options = {"error_budget": "the CETT output-error budget (e.g. 0.2); without it the budget reaching "
                               "the target sparsity is searched"}
    target_scope = MLP_SCOPE

    def check_target(self, sparsity, options):
        if options.get("error_budget") is not None:
            budget = options["error_budget"]
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
                raise CalibrationError(f"error_budget must be a number >= 0, got {budget!r}")
            return None  # the budget decides the sparsity
        return check_sparsity(sparsity)

    def make(self, cal, sparsity: float | None, error_budget: float | None = None, **_) -> Made:
        downs = mlp_downs(cal.sites)
        samples = {s.module: cal.stats.cett[s.module] for s in downs}
        hists = {s.module: cal.stats.act[s.module] for s in downs}
        sizes = {s.module: float(s.params * len(skipped_modules(s))) for s in downs}
        searched = error_budget is None
        budget = budget_for_sparsity(samples, hists, sizes, sparsity) if searched else float(error_budget)
        th = cett_thresholds(samples, budget)
        acts, measured, errors = {}, {}, {}
        for s in downs:
            t, err = th[s.module]
            acts[s.module] = t
            errors[s.module] = round(err, 6)
            for m in skipped_modules(s):
                measured[m] = hists[s.module].cdf(t)
        info = {"cett": {"error_budget": budget, "budget_searched_for_target": searched,
                         "tokens": samples[downs[0].module].rows if downs else 0, "error": errors,
                         "mean_error": sum(errors.values()) / max(1, len(errors))}}
        return Made([ActivationThresholds(acts)], measured, sparsity, info)
