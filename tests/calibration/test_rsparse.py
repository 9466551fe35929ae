"""rsparse calibration: SVD option errors, the bytes-budget search, and the plans it makes."""

from __future__ import annotations

import itertools

import pytest
import torch

from actsparse.calibration import CalibrationError, Calibrator
from actsparse.calibration import LogHistogram
from actsparse.calibration.rsparse import exchange, option_errors, spectrum
from actsparse.calibration.sites import SiteRecord
from actsparse.models import tiny
from actsparse.plan import SparsityPlan
from actsparse.plan.rules.rsparse import LowRankSparse
from tests.masking import compiled_prefill_decode, token_inputs


def test_option_errors_match_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(9, 6, generator=g), torch.randn(40, 6, generator=g)
    ts, ranks = [0.0, 0.4, 1.2], [0, 2, 6]
    err = option_errors(w, x, ts, ranks)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    y = x.double() @ w.double().T
    for (i, t), (j, r) in itertools.product(enumerate(ts), enumerate(ranks)):
        m = x.abs() > t if t > 0 else torch.ones_like(x, dtype=torch.bool)
        approx = (x * m).double() @ w.double().T + ((x * ~m).double() @ vh[:r].T * s[:r]) @ u[:, :r].T
        want = ((approx - y).pow(2).sum(-1) / y.pow(2).sum(-1)).mean()
        assert float(err[i, j]) == pytest.approx(float(want), rel=1e-4, abs=1e-7)
    assert float(err[1, 2]) == pytest.approx(0.0, abs=1e-7)  # full rank: exact


def test_exchange_never_costs_more_bytes_or_error_than_its_base():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 40, generator=g) @ torch.diag(torch.logspace(0, -2, 40))  # a decaying spectrum
    x = torch.randn(200, 40, generator=g) * torch.logspace(0, -1, 40)
    hist = LogHistogram()
    hist.update(x)
    site = SiteRecord("lin", "mlp_down", 0, 40, 48, "lin")
    for s0 in (0.3, 0.5, 0.7):
        s, t, r, err = exchange(site, s0, hist, w, x, spectrum(w))
        base = float(option_errors(w, x, [hist.quantile(s0)], [0])[0, 0])
        assert (1 - s) * 40 * 48 + r * (40 + 48) <= (1 - s0) * 40 * 48 + 1e-6
        assert err <= base + 1e-9 and s >= s0 and t == hist.quantile(s)
    assert exchange(site, 0.0, hist, w, x, spectrum(w)) == (0.0, 0.0, 0, 0.0)


@pytest.fixture(scope="module")
def llama_cal():
    model = tiny("llama")
    ids = torch.randint(3, 128, (3000,), generator=torch.Generator().manual_seed(0))
    return model, Calibrator(model, ids, methods=("rsparse", "teal-greedy"), token_budget=1024, seq_len=64, progress=False)


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_plan_meets_the_effective_target_counting_lowrank_bytes(llama_cal, target, tmp_path):
    model, cal = llama_cal
    plan = cal.plan("rsparse", target, tokens=256)
    rule = plan.rule(LowRankSparse)
    specs = rule.specs
    dense = sum(sp["in_features"] * sp["out_features"] for sp in specs.values())
    read = sum((1 - sp["sparsity"]) * sp["in_features"] * sp["out_features"] for sp in specs.values())
    effective = 1 - (read + rule.lowrank_params()) / dense
    assert effective == pytest.approx(plan.overall_sparsity, abs=1e-4)
    assert target - 0.03 <= effective <= target + 0.05  # the histogram quantiles are approximate
    base = cal.plan("teal-greedy", target)
    assert effective >= base.overall_sparsity - 0.01  # the exchange spends no more bytes than its base
    back = SparsityPlan.load(plan.save(tmp_path / "p.json"), model=model)
    assert back == plan


def test_calibrated_plan_compiles_and_its_options_are_checked(llama_cal):
    model, cal = llama_cal
    plan = cal.plan("rsparse", 0.5, tokens=256)
    ids, dec = token_inputs(1, 5, 1, seed=3, low=3)
    got = compiled_prefill_decode(model, plan, ids, dec)
    assert all(torch.isfinite(x).all() for x in got)
    with pytest.raises(CalibrationError, match="tokens"):
        cal.plan("rsparse", 0.5, tokens=0)
    with pytest.raises(CalibrationError, match="base"):
        cal.plan("rsparse", 0.5, base="cats")
    uniform = cal.plan("rsparse", 0.5, tokens=256, base="teal")
    assert uniform.info["rsparse"]["base"] == "teal" and uniform.overall_sparsity >= 0.47
