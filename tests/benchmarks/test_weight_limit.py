"""The e2e benchmark's weight-bandwidth limit: bytes a decode step reads under a plan (CPU)."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.models import tiny
from benchmarks.decode import decoder_linears, weight_bytes
from benchmarks.e2e import calibrate_on_tokens
from benchmarks.weight_limit import _cuda_pays, bytes_per_step, limit_tok_s, site_sparsity


def _linear_bytes(model, names):
    return sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in names)


def _plan(model, sparsity, measured=None):
    names = decoder_linears(model)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.5 for n in names}, target=sparsity)
    plan.measured.update(measured or {})
    return plan, names


def always(*_):
    return True


def test_dense_reads_every_weight():
    model = tiny("llama")
    assert bytes_per_step(model, None) == weight_bytes(model)
    assert bytes_per_step(model, _plan(model, 0.0)[0], pays=always) == pytest.approx(weight_bytes(model))


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_masked_linears_read_their_union(batch):
    model = tiny("llama")
    plan, names = _plan(model, 0.5)
    lin = _linear_bytes(model, names)
    expect = weight_bytes(model) - lin * 0.5 ** batch  # union density 1 - s^B
    assert bytes_per_step(model, plan, batch, pays=always) == pytest.approx(expect)
    # a layer the backend runs dense reads all of its weight
    assert bytes_per_step(model, plan, batch, pays=lambda *a: False) == pytest.approx(weight_bytes(model))


def test_measured_sparsity_wins_over_target():
    model = tiny("llama")
    names = decoder_linears(model)
    plan, _ = _plan(model, 0.5, {names[0]: 0.9})
    sp = site_sparsity(plan)
    assert sp[names[0]] == 0.9 and sp[names[1]] == 0.5
    w = model.get_submodule(names[0]).weight
    base = bytes_per_step(model, _plan(model, 0.5)[0], pays=always)
    assert bytes_per_step(model, plan, pays=always) == pytest.approx(base - 0.4 * w.numel() * w.element_size())
    assert site_sparsity(None) == {}


def test_default_decision_is_the_backends():
    """By default a layer counts as sparse where the backend's cost model runs it sparse: an
    8B-sized layer at batch 1, not at 16 rows (the union is dense); a tiny model never."""
    assert _cuda_pays(1, 4096, 14336, 0.5, 2) and not _cuda_pays(16, 4096, 14336, 0.5, 2)
    model = tiny("llama")
    plan, _ = _plan(model, 0.5)
    assert bytes_per_step(model, plan, 16) == pytest.approx(weight_bytes(model))


def test_limit_tok_s():
    assert limit_tok_s(8e9, 4e12) == pytest.approx(500.0)
    assert limit_tok_s(8e9, 4e12, batch=4) == pytest.approx(2000.0)


def test_calibration_records_each_inputs_sparsity():
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    plan = calibrate_on_tokens(model, ids, 0.4)
    sp = site_sparsity(plan)
    assert set(sp) == set(decoder_linears(model))
    assert all(abs(s - 0.4) < 0.05 for s in sp.values())


def test_lm_head_threshold_counts_in_the_bytes():
    """A plan with LM-head sparsity reads less of the head too (its measured sparsity)."""
    from actsparse.calibration.lm_head import add_lm_head_sparsity

    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    plan = calibrate_on_tokens(model, ids, 0.4)
    before = bytes_per_step(model, plan, pays=always)
    add_lm_head_sparsity(plan, model, ids, 0.5, token_budget=64, seq_len=64, batch_size=1)
    head = model.get_output_embeddings().weight
    saved = plan.measured["lm_head"] * head.numel() * head.element_size()
    assert bytes_per_step(model, plan, pays=always) == pytest.approx(before - saved)
