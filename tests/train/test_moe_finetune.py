"""Fine-tuning a dense-to-MoE model: the routed training forward, KL going down, thresholds
recalibrated to the density, files round-tripping, option checks."""

from __future__ import annotations

import copy

import pytest
import torch

import actsparse
from actsparse.models import tiny
from actsparse.plan import SparsityPlan
from actsparse.plan.rules.experts import Experts
from actsparse.train.moe_finetune import (MoeFinetuneConfig, _routed_training, _Routing, adapters_path,
                                          finetune_moe, load_finetuned, recalibrate, save_finetuned)
from actsparse.train.distill import kl_teacher_student
from actsparse.train.moefy import permute, routed

DENSITY = 0.5


def ids(model, n=4, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, length), generator=g)


def converted(seed=0):
    """(dense teacher, moefied student, plan) of a tiny Llama with 8 experts per MLP."""
    dense = tiny("llama", seed=seed)
    student, plan = actsparse.moefy(copy.deepcopy(dense), experts=8, density=DENSITY, calibration=ids(dense, 8, 64))
    return dense, student, plan


def config(**kw):
    base = dict(steps=25, batch_size=4, seq_len=24, samples=16, held_out=8, router_lr=3e-3, lr=3e-3)
    return MoeFinetuneConfig(**{**base, **kw})


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_training_forward_is_the_routed_reference():
    """Hard selection at fixed thresholds: the training forward computes what ``routed`` does."""
    _, student, plan = converted()
    routing = _Routing(plan.rule(Experts), DENSITY, 0.25, trainable=True)
    routing.quantile = False
    x = ids(student, 2, 16, seed=3)
    with routed(student, plan):
        want = logits(student, x)
    with _routed_training(student, routing):
        got = logits(student, x)
        with torch.enable_grad():  # the straight-through mask is 0/1 in the forward too
            got_grad = student(x).logits.detach()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_grad, want, rtol=1e-4, atol=1e-4)


def test_routers_get_a_gradient_from_the_kl():
    dense, student, plan = converted()
    routing = _Routing(plan.rule(Experts), DENSITY, 0.25, trainable=True)
    x = ids(student, 2, 16, seed=4)
    with _routed_training(student, routing):
        loss = kl_teacher_student(logits(dense, x), student(x).logits)
    loss.backward()
    grads = [p.grad for p in routing.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("train", ["router", "lora", "both"])
def test_training_lowers_the_held_out_kl(train):
    dense, student, plan = converted()
    teacher = None if train == "router" else dense
    new, res = finetune_moe(student, plan, teacher, config(train=train))
    assert res.steps == 25 and res.tokens == 25 * 4 * 24 and len(res.kl) == 25
    assert res.held_out_kl_after < res.held_out_kl_before, (res.held_out_kl_before, res.held_out_kl_after)
    assert new.info["finetune"]["train"] == train and new.rule(Experts).specs.keys() == plan.rule(Experts).specs.keys()
    if train == "router":  # the weights did not move; only the routers did
        torch.testing.assert_close(logits(student, ids(student)), logits(dense_permuted(dense, plan), ids(student)))


def dense_permuted(dense, plan):
    return permute(copy.deepcopy(dense), plan)


def test_density_after_recalibration_meets_the_target():
    dense, student, plan = converted()
    calib = ids(student, 6, 48, seed=7)
    new, res = finetune_moe(student, plan, dense, config(train="both", density=0.375), calibration=calib)
    assert all(abs(d - 0.375) < 0.02 for d in res.density), res.density
    masks = {}
    with routed(student, new, record=masks):
        logits(student, calib)
    run = [float(torch.cat(v).float().mean()) for v in masks.values()]
    assert all(abs(d - 0.375) < 0.02 for d in run), run
    assert all(sp["density"] == 0.375 for sp in new.rule(Experts).specs.values())
    assert abs(new.target - 0.625) < 1e-9


def test_recalibrate_alone_keeps_routers_and_moves_thresholds():
    _, student, plan = converted()
    calib = ids(student, 4, 48, seed=8)
    new = recalibrate(student, plan, calib, density=0.25)
    old, got = plan.rule(Experts), new.rule(Experts)
    for name in old.specs:
        for a, b in zip(old.router(name), got.router(name)):
            torch.testing.assert_close(a, b)
        assert got.specs[name]["threshold"] > old.specs[name]["threshold"]
    assert all(abs(1 - m - 0.25) < 0.02 for m in new.measured.values())


@pytest.mark.parametrize("train", ["router", "both"])
def test_save_load_round_trip_reproduces_logits(tmp_path, train):
    dense, student, plan = converted()
    new, _ = finetune_moe(student, plan, dense, config(train=train, steps=5, held_out=0))
    x = ids(student, 2, 20, seed=9)
    with routed(student, new):
        want = logits(student, x)
    path = tmp_path / "moe.plan.json"
    files = save_finetuned(student, new, path)
    assert ("adapters" in files) == (train == "both")
    assert adapters_path(path).is_file() == (train == "both")
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    model, loaded = load_finetuned(copy.deepcopy(dense), path)
    with routed(model, loaded):
        got = logits(model, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_options_say_what_is_wrong():
    dense, student, plan = converted()
    bad = [(dict(train="experts"), "train must be one of router, lora, both"),
           (dict(steps=0), "steps must be an integer >= 1"),
           (dict(density=1.5), r"density must be a number in \(0, 1\]"),
           (dict(router_lr=-1.0), "router_lr must be a finite number > 0"),
           (dict(tau=float("nan")), "tau must be a finite number > 0"),
           (dict(targets=("q_proj",)), "targets must be a non-empty subset of gate_proj, up_proj, down_proj")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            finetune_moe(student, plan, dense, config(**kw))
    with pytest.raises(ValueError, match="needs the dense teacher"):
        finetune_moe(student, plan, None, config(train="lora"))
    with pytest.raises(ValueError, match="experts rule"):
        finetune_moe(student, SparsityPlan(method="none"), dense, config())
    with pytest.raises(ValueError, match="integer tensor"):
        finetune_moe(student, plan, dense, config(), sequences=torch.rand(2, 8))
