"""The ``experts`` rule: gated MLPs lowered to route_experts + expert_mlp; compiled == the eager
routed model (``actsparse.train.moefy.routed``), prefill and decode, random configs and plans."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse import ops
from actsparse.models import tiny
from actsparse.passes.pipeline import run_passes
from actsparse.plan import PlanError
from actsparse.plan.rules.exact import ExactZeros
from actsparse.train.moefy import routed
from tests.masking import prefill_decode
from tests.passes.test_insert_masks import GM, SL, _close, capture

EM = torch.ops.actsparse.expert_mlp.default
RE = torch.ops.actsparse.route_experts.default


def moe(experts=4, density=0.5, router="linear", layers=2, act="silu", seed=0, **kw):
    model = tiny("llama", hidden_act=act, num_hidden_layers=layers, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (4, 48), generator=g)
    return actsparse.moefy(model, experts=experts, density=density, calibration=ids, router=router, hidden=8,
                           router_steps=20, seed=seed)


def eager(model, plan, ids):
    with torch.no_grad(), routed(model, plan):
        return model(ids).logits


def test_decode_is_one_routed_expert_call_per_mlp():
    model, plan = moe()
    cap, out, ids = capture(model, plan, 1)
    assert len(cap.calls(EM)) == 2 and len(cap.calls(RE)) == 2 and not cap.calls(GM) and not cap.calls(SL)
    assert cap.ctx.stats.expert_mlp_calls == 2
    for n in cap.calls(EM):
        assert ops.bound_args(n)["act"] == "silu"
    _close(out, eager(model, plan, ids))
    assert "experts E=4" in cap.ctx.table or cap.ctx.table == ""


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(experts=st.sampled_from([2, 7, 8, 16]), density=st.sampled_from([0.25, 0.5, 0.9]),
       router=st.sampled_from(["linear", "mlp"]), act=st.sampled_from(["silu", "relu", "gelu_pytorch_tanh"]),
       rows=st.integers(1, 6), batch=st.integers(1, 2), seed=st.integers(0, 3))
def test_random_configs_and_plans_match_eager(experts, density, router, act, rows, batch, seed):
    model, plan = moe(experts, density, router, layers=1, act=act, seed=seed)
    cap, out, ids = capture(model, plan, rows, batch=batch, seed=seed)
    assert len(cap.calls(EM)) == 1
    _close(out, eager(model, plan, ids))


@pytest.mark.parametrize("path", ["cpu", "dense"])
def test_compiled_backend_equals_eager_prefill_and_decode(path):
    model, plan = moe(experts=8, density=0.4)
    g = torch.Generator().manual_seed(1)
    ids, dec = torch.randint(3, 100, (1, 5), generator=g), torch.randint(3, 100, (1, 3), generator=g)
    with routed(model, plan):
        want = prefill_decode(model, model, ids, dec)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="sparse", options={"plan": plan})
    with ops.dispatch.forced(path):
        got = prefill_decode(fast, model, ids, dec)
    torch._dynamo.reset()
    for a, b in zip(got, want):
        _close(a, b)


def plan_error(model, plan) -> str:
    """The PlanError the passes raise on ``model``'s graph (Dynamo would wrap it)."""
    errors = []

    def be(gm, example_inputs):
        try:
            run_passes(gm, plan)
        except PlanError as e:
            errors.append(e)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=be)(torch.tensor([[1, 2]]))
    torch._dynamo.reset()
    assert len(errors) == 1
    return str(errors[0])


def test_an_mlp_takes_one_rule():
    model, plan = moe()
    plan.add(ExactZeros(["model.layers.0.mlp.down_proj"]))
    assert "experts rule and other rules" in plan_error(model, plan)


def test_plan_for_another_activation_is_refused():
    model, plan = moe(act="silu")
    relu = tiny("llama", hidden_act="relu", num_hidden_layers=2)
    assert "activation 'silu'" in plan_error(relu, plan)
