"""teal-seq: thresholds calibrated on the masked model's own activations."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.calibration import Calibrator
from actsparse.calibration.sequential import calibration_batch, exact_quantile
from actsparse.calibration.sites import groups
from actsparse.models import tiny
from tests.masking import compiled_prefill_decode, masked, prefill_decode, token_inputs


@pytest.fixture(scope="module")
def llama_cal():
    model = tiny("llama")
    ids = torch.randint(3, 128, (3000,), generator=torch.Generator().manual_seed(0))
    return model, Calibrator(model, ids, methods=("teal", "teal-seq"), token_budget=1024, seq_len=64,
                             progress=False)


def test_exact_quantile_is_the_kth_smallest_magnitude():
    x = torch.tensor([[-4.0, 1.0], [3.0, -2.0]])
    assert exact_quantile(x, 0.5) == 2.0 and exact_quantile(x, 0.0) == 0.0 and exact_quantile(x, 1.0) == 4.0


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_every_input_meets_the_target_on_the_masked_model(llama_cal, target):
    """Replaying the plan with hooks, each shared input, as it arrives (earlier masks applied),
    has the target fraction at or below its threshold: the invariant uniform TEAL lacks."""
    model, cal = llama_cal
    plan = cal.plan("teal-seq", target)
    assert plan.method == "teal-seq" and plan.overall_sparsity == pytest.approx(target, abs=0.01)
    seen: dict[str, float] = {}
    mods = dict(model.named_modules())

    def observe(g):
        def pre(mod, args):
            seen[g] = float((args[0].abs() <= plan.thresholds[g]).float().mean())
        return pre

    hs = [mods[g].register_forward_pre_hook(observe(g)) for g in groups(cal.sites)]  # before the masks
    try:
        with masked(model, plan), torch.no_grad():
            model(input_ids=calibration_batch(cal.batches), use_cache=False)
    finally:
        for h in hs:
            h.remove()
    assert seen.keys() == groups(cal.sites).keys()
    for g, frac in seen.items():
        assert frac == pytest.approx(target, abs=2e-3), g
        assert plan.measured[g] == pytest.approx(frac, abs=1e-6)


def test_first_input_matches_teal_and_later_ones_move(llama_cal):
    model, cal = llama_cal
    seq, teal = cal.plan("teal-seq", 0.5), cal.plan("teal", 0.5)
    first = next(iter(groups(cal.sites)))
    assert seq.thresholds[first] == pytest.approx(teal.thresholds[first], rel=0.05)  # histogram vs exact
    assert any(abs(seq.thresholds[m] - teal.thresholds[m]) > 0.05 * teal.thresholds[m] for m in teal.thresholds)
    assert seq.thresholds.keys() == teal.thresholds.keys()


def test_teal_seq_plan_lowers_to_the_hook_reference(llama_cal, tmp_path):
    model, cal = llama_cal
    plan = actsparse.SparsityPlan.load(cal.plan("teal-seq", 0.5).save(tmp_path / "p.json"), model=model)
    ids, dec = token_inputs(2, 7, 1, seed=3, low=3)
    got = compiled_prefill_decode(model, plan, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max() <= 2e-4 * y.abs().max() + 1e-5


def test_greedy_seq_takes_the_greedy_allocation_with_sequential_thresholds():
    model = tiny("llama")
    ids = torch.randint(3, 128, (3000,), generator=torch.Generator().manual_seed(0))
    cal = Calibrator(model, ids, methods=("teal-greedy", "teal-greedy-seq"), token_budget=1024, seq_len=64,
                     progress=False, greedy_step=0.04)
    plan, greedy = cal.plan("teal-greedy-seq", 0.5), cal.plan("teal-greedy", 0.5)
    assert plan.thresholds.keys() == greedy.thresholds.keys()
    for m, s in greedy.measured.items():  # the same per-linear sparsities, reached on masked inputs
        assert plan.measured[m] == pytest.approx(s, abs=0.03), m
    assert plan.overall_sparsity == pytest.approx(greedy.overall_sparsity, abs=0.01)
