"""Dense-to-MoE conversion: clustering, permutation, routers, thresholds, the plan file."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.models import tiny
from actsparse.plan import PlanError, SparsityPlan
from actsparse.plan.rules.experts import Experts
from actsparse.train.moefy import (MoefyReport, balanced_kmeans, expert_norms, expert_permutation,
                                   fit_linear_router, permute, permute_mlp, routed)
from actsparse.train.relufy import gated_mlps


def calib(model, n=4, length=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, length), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_balanced_kmeans_is_balanced_and_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 10, generator=g)
    feats = centres.repeat_interleave(12, 0) + 0.05 * torch.randn(48, 10, generator=g)
    labels = balanced_kmeans(feats, 4, seed=3)
    assert torch.bincount(labels, minlength=4).tolist() == [12] * 4
    # well-separated clusters are recovered: each true cluster maps to one label
    assert all(len(set(labels[i * 12:(i + 1) * 12].tolist())) == 1 for i in range(4))
    assert torch.equal(labels, balanced_kmeans(feats, 4, seed=3))
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_kmeans(feats, 5)


def test_permutation_leaves_the_dense_model_unchanged():
    model = tiny("llama")
    ids = calib(model, 2, 12)
    before = logits(model, ids)
    g = torch.Generator().manual_seed(1)
    for m in gated_mlps(model):
        permute_mlp(m.module, torch.randperm(m.module.gate_proj.out_features, generator=g))
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


def test_experts_are_contiguous_blocks():
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    perm = expert_permutation(labels)
    assert labels[perm].tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("features", ["coact", "down"])
def test_moefy_full_density_is_the_dense_model(features):
    model = tiny("llama")
    ids = calib(model, 1, 16, seed=5)
    before = logits(model, ids)
    model, plan = actsparse.moefy(model, experts=8, density=1.0, calibration=calib(model), features=features)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)  # permuted only
    with routed(model, plan):
        torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)  # every expert runs


@pytest.mark.parametrize("router", ["linear", "mlp"])
def test_threshold_meets_the_target_density(router):
    model = tiny("llama")
    rep = MoefyReport()
    model, plan = actsparse.moefy(model, experts=14, density=0.3, calibration=calib(model), router=router,
                                  hidden=16, router_steps=50, report=rep)
    assert rep.tokens == 256 and len(rep.density) == 2
    assert all(abs(d - 0.3) < 0.02 for d in rep.density), rep.density
    rule = plan.rule(Experts)
    assert len(rule.specs) == 2 and all(s["experts"] == 14 and s["router"] == router for s in rule.specs.values())
    masks = {}
    with routed(model, plan, record=masks):
        logits(model, calib(model)[:, :64])
    assert all(abs(float(torch.cat(v).float().mean()) - 0.3) < 0.05 for v in masks.values())


def test_linear_router_predicts_expert_norms():
    model = tiny("llama")
    model, plan = actsparse.moefy(model, experts=8, density=0.5, calibration=calib(model))
    rep = MoefyReport()
    actsparse.moefy(tiny("llama"), experts=8, density=0.5, calibration=calib(model), report=rep)
    assert min(rep.router_r2) > 0.3, rep.router_r2  # far better than predicting the mean
    m = gated_mlps(model)[0].module
    x = torch.randn(300, 64)
    y = expert_norms(m, x, "silu", 8)
    w, b = fit_linear_router(x, y)
    assert w.shape == (8, 64) and b.shape == (8,)


def test_plan_file_round_trip_and_rebuild(tmp_path):
    ids = calib(tiny("llama"), 1, 10, seed=9)
    model, plan = actsparse.moefy(tiny("llama"), experts=4, density=0.5, calibration=calib(tiny("llama")))
    path = plan.save(tmp_path / "moe.json")
    assert (tmp_path / "moe.json.safetensors").is_file()
    back = SparsityPlan.load(path, model=model)
    assert back == plan
    fresh = permute(tiny("llama"), back)  # the original weights, permuted as the plan records
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with routed(model, plan):
        want = logits(model, ids)
    with routed(fresh, back):
        torch.testing.assert_close(logits(fresh, ids), want)


def test_rule_checks_name_the_problem():
    model, plan = actsparse.moefy(tiny("llama"), experts=4, density=0.5, calibration=calib(tiny("llama")))
    rule = plan.rule(Experts)
    name = next(iter(rule.specs))
    bad = dict(rule.weights)
    bad[f"{name}.perm"] = torch.zeros(112, dtype=torch.int64)
    with pytest.raises(PlanError, match="permutation"):
        Experts(rule.specs, bad).check_tensors()
    spec = dict(rule.specs[name], experts=5)
    with pytest.raises(PlanError, match="equal experts"):
        Experts({name: spec}, {})
    with pytest.raises(PlanError, match="hidden"):
        Experts({name: dict(rule.specs[name], router="mlp")}, {})
    with pytest.raises(PlanError, match="no tensor"):
        Experts({name: rule.specs[name]}, {}).check_tensors()
    with pytest.raises(PlanError, match="another model"):
        plan.validate(tiny("llama", intermediate_size=96))


@pytest.mark.parametrize("kw,msg", [({"experts": 5}, "equal experts"), ({"experts": 0}, "positive integer"),
                                    ({"density": 0.0}, "density"), ({"features": "x"}, "features"),
                                    ({"router": "x"}, "router"), ({"calibration": None}, "calibration")])
def test_moefy_refuses_bad_options(kw, msg):
    model = tiny("llama")
    args = {"experts": 4, "density": 0.5, "calibration": calib(model), **kw}
    with pytest.raises(ValueError, match=msg):
        actsparse.moefy(model, **args)


def test_retarget_changes_only_the_thresholds():
    from actsparse.train.moefy import retarget

    rep = MoefyReport()
    model, plan = actsparse.moefy(tiny("llama"), experts=8, density=0.5, calibration=calib(tiny("llama")), report=rep)
    low = retarget(plan, rep, 0.25)
    a, b = plan.rule(Experts), low.rule(Experts)
    assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    for n in a.specs:
        assert b.specs[n]["threshold"] > a.specs[n]["threshold"] and b.specs[n]["density"] == 0.25
        assert abs(low.measured[n] - 0.75) < 0.02
    low.validate(model)
    with pytest.raises(ValueError, match="density"):
        retarget(plan, rep, 1.5)
