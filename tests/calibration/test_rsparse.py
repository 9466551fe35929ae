"""rsparse calibration: SVD option errors, the bytes-budget search, and the plans it makes."""

from __future__ import annotations

import itertools

import pytest
import torch

import actsparse
from actsparse.calibration import CalibrationError, Calibrator
from actsparse.calibration.rsparse import choose, option_errors
from actsparse.models import tiny
from actsparse.plan import SparsityPlan
from actsparse.plan.rules.rsparse import LowRankSparse
from tests.masking import prefill_decode


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
        assert float(err[i, j]) == pytest.approx(float(want), rel=1e-6, abs=1e-12)
    assert float(err[1, 2]) == pytest.approx(0.0, abs=1e-12)  # full rank: exact


def test_choose_fits_the_budget_with_the_least_error():
    opts = {"a": [(10, 0.0, "a-dense"), (5, 1.0, "a-half"), (2, 5.0, "a-most")],
            "b": [(10, 0.0, "b-dense"), (5, 0.2, "b-half"), (2, 0.9, "b-most")]}
    assert choose(opts, 15) == {"a": "a-dense", "b": "b-half"}
    assert choose(opts, 10) == {"a": "a-half", "b": "b-half"}
    assert choose(opts, 20) == {"a": "a-dense", "b": "b-dense"}
    with pytest.raises(CalibrationError, match="budget"):
        choose(opts, 3)


@pytest.fixture(scope="module")
def llama_cal():
    model = tiny("llama")
    ids = torch.randint(3, 128, (3000,), generator=torch.Generator().manual_seed(0))
    return model, Calibrator(model, ids, methods=("rsparse",), token_budget=1024, seq_len=64, progress=False)


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
    back = SparsityPlan.load(plan.save(tmp_path / "p.json"), model=model)
    assert back == plan


def test_calibrated_plan_compiles_and_its_options_are_checked(llama_cal):
    model, cal = llama_cal
    plan = cal.plan("rsparse", 0.5, tokens=256)
    g = torch.Generator().manual_seed(3)
    ids, dec = torch.randint(3, 128, (1, 5), generator=g), torch.randint(3, 128, (1, 1), generator=g)
    torch._dynamo.reset()
    got = prefill_decode(torch.compile(model.forward, backend=actsparse.backend(plan, compiler="eager")),
                         model, ids, dec)
    torch._dynamo.reset()
    assert all(torch.isfinite(x).all() for x in got)
    with pytest.raises(CalibrationError, match="tokens"):
        cal.plan("rsparse", 0.5, tokens=0)
