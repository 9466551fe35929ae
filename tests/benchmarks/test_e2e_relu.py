"""The relufied decode benchmark's byte model and its option checks (CPU)."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.models import tiny
from benchmarks.e2e_relu import main, mlp_bytes_saved


def _relufied(sparsity):
    model = tiny("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    if sparsity:
        return actsparse.relufy(model, "shifted-relu", tokens=ids, sparsity=sparsity)
    return actsparse.relufy(model, "relu", tokens=ids)


@pytest.mark.parametrize("sparsity", [0.0, 0.85])
def test_saved_bytes_are_up_and_down_rows_of_the_zero_neurons(sparsity):
    model, plan = _relufied(sparsity)
    want = 0.0
    for down, s in plan.measured.items():
        mlp = model.get_submodule(down.rsplit(".", 1)[0])
        assert mlp.gate_proj.weight.numel() == mlp.up_proj.weight.numel()
        want += s * (mlp.up_proj.weight.numel() + mlp.down_proj.weight.numel()) * mlp.up_proj.weight.element_size()
    assert mlp_bytes_saved(model, plan) == pytest.approx(want)
    mean = sum(plan.measured.values()) / len(plan.measured)
    assert mean == pytest.approx(sparsity or 0.5, abs=0.15)


def test_no_zeros_saves_nothing():
    model, plan = _relufied(0.0)
    plan.measured = {k: 0.0 for k in plan.measured}
    assert mlp_bytes_saved(model, plan) == 0.0


@pytest.mark.parametrize("bad", ["1.0", "-0.1"])
def test_refuses_a_sparsity_outside_0_1(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--mlp-sparsity", bad, "--out", "unused.json"])
    assert e.value.code == 2
    assert "--mlp-sparsity" in capsys.readouterr().err
