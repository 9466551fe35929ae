"""benchmarks.mask_sensitivity on a tiny model: no perturbation gives the reference itself, the
eager-compiled graph matches it, and a perturbation moves the logits."""

from __future__ import annotations

import torch

from actsparse.models import tiny
from benchmarks.mask_sensitivity import compare, measure


def test_rows_against_the_masked_reference():
    model = tiny("llama", intermediate_size=96)
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    rows = measure(model, ids, 0.3, [0.0, 1e-2], ["eager"])
    exact, moved, compiled = rows
    assert exact["median_rel_logit_diff"] == 0.0 and exact["argmax_agreement"] == 1.0
    assert moved["max_rel_logit_diff"] > 1e-4
    assert compiled["variant"] == "sparse backend, compiler=eager" and compiled["max_rel_logit_diff"] < 1e-5
    assert all(r["masked_linears"] == 14 and r["threshold"] == 0.3 for r in rows)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_compare_reads_each_position():
    ref = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    got = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])
    c = compare(got, ref)
    assert c["median_rel_logit_diff"] == 0.75 and c["max_rel_logit_diff"] == 1.5 and c["argmax_agreement"] == 0.5
