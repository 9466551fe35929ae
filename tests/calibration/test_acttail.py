"""Tail-aware allocation: the Hill estimator, the budgets, and the plan it makes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.calibration import CalibrationError, Calibrator, LogHistogram
from actsparse.calibration.acttail import hill_alpha, tail_budgets
from actsparse.calibration.sites import groups, masked_sites
from actsparse.models import tiny
from tests.masking import masked, prefill_decode


def _pareto(alpha: float, n: int, seed: int) -> torch.Tensor:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u.clamp_min(1e-12) ** (-1.0 / alpha)).float()


@pytest.mark.parametrize("alpha", [1.5, 3.0, 6.0])
def test_hill_recovers_a_pareto_tail_index(alpha):
    h = LogHistogram()
    x = _pareto(alpha, 200_000, 0)
    h.update(x * torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0))
    assert hill_alpha(h, 0.1) == pytest.approx(alpha, rel=0.05)


def test_hill_orders_tails_and_handles_zeros():
    g = torch.Generator().manual_seed(0)
    gauss, laplace = LogHistogram(), LogHistogram()
    gauss.update(torch.randn(100_000, generator=g))
    laplace.update(torch.distributions.Laplace(0.0, 1.0).sample((100_000,)))
    assert hill_alpha(laplace) < hill_alpha(gauss)  # the exponential tail is the heavier one
    zeros = LogHistogram()
    zeros.update(torch.zeros(1000))
    assert math.isnan(hill_alpha(zeros)) and math.isnan(hill_alpha(LogHistogram()))
    with pytest.raises(CalibrationError, match="tail"):
        hill_alpha(gauss, 1.5)


@settings(max_examples=60, deadline=None)
@given(alphas=st.lists(st.floats(0.5, 20.0), min_size=1, max_size=12), target=st.floats(0.05, 0.8),
       spread=st.floats(0.01, 0.3), seed=st.integers(0, 999))
def test_budgets_average_to_the_target_and_follow_the_tails(alphas, target, spread, seed):
    g = torch.Generator().manual_seed(seed)
    keys = [f"g{i}" for i in range(len(alphas))]
    params = {k: int(torch.randint(1, 1000, (1,), generator=g)) for k in keys}
    a = dict(zip(keys, alphas))
    s = tail_budgets(a, params, target, spread)
    mean = sum(s[k] * params[k] for k in keys) / sum(params.values())
    assert mean == pytest.approx(target, abs=1e-6)
    assert all(0.0 <= v <= 0.99 for v in s.values())
    for i in keys:
        for j in keys:
            if a[i] < a[j]:
                assert s[i] <= s[j] + 1e-12  # heavier tail, no more sparsity
    if len(set(alphas)) > 1 and spread + target < 0.99 and target - spread > 0:
        lo, hi = min(keys, key=a.get), max(keys, key=a.get)
        assert s[lo] < s[hi]  # and strictly less where nothing is clipped


def test_budgets_unknown_tails_take_the_median():
    s = tail_budgets({"a": 1.0, "b": math.nan, "c": 4.0}, {"a": 1, "b": 1, "c": 1}, 0.5, 0.1)
    assert s["a"] < s["b"] < s["c"] and sum(s.values()) / 3 == pytest.approx(0.5)


@pytest.fixture(scope="module")
def llama_cal():
    model = tiny("llama")
    ids = torch.randint(3, 128, (3000,), generator=torch.Generator().manual_seed(0))
    return model, Calibrator(model, ids, methods=("acttail",), token_budget=2048, seq_len=64, progress=False)


@pytest.mark.parametrize("target", [0.4, 0.5])
def test_acttail_plan_meets_the_target_and_spends_it_by_tail(llama_cal, target):
    model, cal = llama_cal
    plan = cal.plan("acttail", target)
    assert plan.method == "acttail" and plan.overall_sparsity == pytest.approx(target, abs=0.01)
    info = plan.info["acttail"]
    alpha, budgets = info["alpha"], info["budgets"]
    heavy, light = min(alpha, key=alpha.get), max(alpha, key=alpha.get)
    assert budgets[heavy] < target < budgets[light]
    for g, members in groups(cal.sites).items():
        for s in members:
            assert plan.measured[s.module] == pytest.approx(budgets[g], abs=0.02)
    assert len(set(plan.thresholds.values())) > 1  # not uniform


def test_acttail_plan_lowers_to_the_hook_reference(llama_cal):
    model, cal = llama_cal
    plan = cal.plan("acttail", 0.5, spread=0.2)
    g = torch.Generator().manual_seed(3)
    ids, dec = torch.randint(3, 128, (2, 7), generator=g), torch.randint(3, 128, (2, 1), generator=g)
    be = actsparse.backend(plan, compiler="eager")
    torch._dynamo.reset()
    got = prefill_decode(torch.compile(model.forward, backend=be), model, ids, dec)
    torch._dynamo.reset()
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max() <= 2e-4 * y.abs().max() + 1e-5
    assert be.masked_sites == be.graphs * len(masked_sites(cal.sites))  # prefill and decode graphs
    assert all(s.rule.startswith("teal t=") for s in be.sites if s.module in plan.thresholds)


def test_acttail_options_are_checked(llama_cal):
    _, cal = llama_cal
    with pytest.raises(CalibrationError, match="spread"):
        cal.plan("acttail", 0.5, spread=2.0)
    with pytest.raises(CalibrationError, match="tail"):
        cal.plan("acttail", 0.5, tail=0.0 + 1.0)
    with pytest.raises(CalibrationError, match="applies to method acttail only"):
        cal.plan("teal", 0.5, spread=0.1)
