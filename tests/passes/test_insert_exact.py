"""The ``exact`` rule: ReLU MLPs lowered to the gated op with threshold 0 (or an exact-zero
down mask), compiled == eager, composing with TEAL thresholds elsewhere."""

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
from tests.masking import linear_names, masked, prefill_decode
from tests.passes.test_insert_masks import GM, SL, _close, capture, reference


def relu_llama(**kw):
    return tiny("llama", hidden_act="relu", **{"num_hidden_layers": 2, **kw})


def downs(model):
    return [n for n in linear_names(model) if n.endswith("down_proj")]


def exact_plan(model, thresholds=None):
    plan = actsparse.SparsityPlan.from_thresholds(model, thresholds or {})
    plan.add(ExactZeros(downs(model)))
    plan.validate(model)
    return plan


def test_decode_is_one_gated_call_with_threshold_zero():
    model = relu_llama()
    plan = exact_plan(model)
    cap, out, ids = capture(model, plan, 1)
    calls = cap.calls(GM)
    assert len(calls) == 2 and not cap.calls(SL) and cap.ctx.stats.found_rules == set(downs(model))
    for n in calls:
        args = ops.bound_args(n)
        assert args["act"] == "relu" and args["threshold"] == 0.0
    with torch.no_grad():
        dense = model(ids).logits
    _close(out, dense)  # exact: the plan changes nothing


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), rows=st.integers(1, 6), batch=st.integers(1, 2))
def test_exact_composes_with_teal_on_other_linears(data, rows, batch):
    model = relu_llama(num_hidden_layers=1)
    attn = [n for n in linear_names(model) if ".self_attn." in n]
    chosen = data.draw(st.lists(st.sampled_from(attn), unique=True), label="teal")
    plan = exact_plan(model, {n: data.draw(st.sampled_from([0.0, 0.2, 1.0]), label=n) for n in chosen})
    cap, out, ids = capture(model, plan, rows, batch=batch)
    _close(out, reference(model, plan, ids))  # the hooks apply TEAL; exact zeros need no hook


def test_compiled_backend_equals_eager_prefill_and_decode():
    model = relu_llama()
    plan = exact_plan(model)
    g = torch.Generator().manual_seed(1)
    ids, dec = torch.randint(1, 100, (1, 5), generator=g), torch.randint(1, 100, (1, 3), generator=g)
    want = prefill_decode(model, model, ids, dec)
    torch._dynamo.reset()
    fast = torch.compile(model, backend=actsparse.backend(plan))
    got = prefill_decode(fast, model, ids, dec)
    torch._dynamo.reset()
    for a, b in zip(got, want):
        _close(a, b)


class DReLUMLP(torch.nn.Module):
    """``down(relu(gate x) * relu(up x))``: not the gated pattern, so an exact down-input mask."""

    def __init__(self, d=8, f=24):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(d, f, bias=False), torch.nn.Linear(d, f, bias=False)
        self.down_proj = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.gate_proj(x)) * torch.relu(self.up_proj(x)))


def test_ungated_mlp_gets_an_exact_down_mask():
    model = DReLUMLP()
    plan = actsparse.SparsityPlan(rules=[ExactZeros(["down_proj"])])
    seen = []

    def be(gm, example_inputs):
        seen.append(run_passes(gm, plan))
        seen.append(gm)
        return gm.forward

    x = torch.randn(1, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
        want = model(x)
    torch._dynamo.reset()
    ctx, gm = seen
    assert ctx.stats.found_rules == {"down_proj"} and ctx.stats.sparse_linear_calls == 1
    assert any(n.target == SL for n in gm.graph.nodes)
    torch.testing.assert_close(out, want)


def pass_error(model, plan) -> PlanError:
    """The PlanError ``run_passes`` raises on the model's graph."""
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
    return errors[0]


def test_exact_and_cats_on_one_mlp_is_a_plan_error():
    model = relu_llama(num_hidden_layers=1)
    d = downs(model)[0]
    plan = exact_plan(model)
    plan.activation_thresholds[d] = 0.1
    assert "exact rule and a CATS" in str(pass_error(model, plan))


@pytest.mark.parametrize("rows", [1, 3])
def test_input_thresholds_on_gate_up_keep_them_linears_and_mask_down_exactly(rows):
    model = relu_llama(num_hidden_layers=1)
    mlp = "model.layers.0.mlp."
    plan = exact_plan(model, {mlp + "gate_proj": 0.0, mlp + "up_proj": 0.3})
    cap, out, ids = capture(model, plan, rows)
    assert not cap.calls(GM) and cap.ctx.stats.found_rules == {mlp + p for p in ("gate_proj", "up_proj", "down_proj")}
    mods = sorted(m for n in cap.calls(SL) for m in cap.weight_modules(n))
    assert mods == [mlp + "down_proj", mlp + "gate_proj", mlp + "up_proj"]
    _close(out, reference(model, plan, ids))


def test_exact_on_a_non_mlp_linear_is_a_plan_error():
    model = relu_llama(num_hidden_layers=1)
    plan = actsparse.SparsityPlan(rules=[ExactZeros(["model.layers.0.self_attn.q_proj"])])
    assert "no MLP down projection" in str(pass_error(model, plan))


def test_hook_reference_ignores_the_exact_rule():
    model = relu_llama(num_hidden_layers=1)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), masked(model, exact_plan(model)):
        a = model(ids).logits
    with torch.no_grad():
        b = model(ids).logits
    torch.testing.assert_close(a, b)
