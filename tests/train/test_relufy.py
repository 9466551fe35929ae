"""relufy: each variant's MLP math on tiny random Llama and Gemma 3, its exact plan compiled ==
eager, and clear errors for bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import actsparse
from actsparse.models import tiny
from actsparse.plan import PlanError
from actsparse.plan.rules.exact import ExactZeros
from actsparse.train import VARIANTS, gated_mlps, mlp_sparsity
from tests.masking import prefill_decode

IDS = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(3))


def expected_mlp(w, x, variant, shift=0.0):
    """The variant's MLP from the original weights, written out."""
    if variant == "relu-gate":
        x = torch.relu(x)
    g = F.linear(x, w["gate"]) - shift
    u = F.linear(x, w["up"])
    if variant == "drelu":
        u = torch.relu(u)
    return F.linear(torch.relu(g) * u, w["down"])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_computes_its_mlp(arch, variant):
    model = tiny(arch, num_hidden_layers=2)
    mlps = gated_mlps(model)
    assert len(mlps) == 2
    w = [{p: m.module.get_submodule(f"{p}_proj").weight.detach().clone() for p in ("gate", "up", "down")}
         for m in mlps]
    kw = {"shift": [0.1, -0.2]} if variant == "shifted-relu" else {}
    out, plan = actsparse.relufy(model, variant, **kw)
    assert out is model
    x = torch.randn(3, model.config.hidden_size)
    for i, m in enumerate(gated_mlps(model)):
        shift = kw["shift"][i] if kw else 0.0
        with torch.no_grad():
            torch.testing.assert_close(m.module(x), expected_mlp(w[i], x, variant, shift))
    assert plan.rule(ExactZeros).modules_ == [m.part("down_proj") for m in mlps]
    assert plan.method == f"relufy-{variant}" and plan.info["variant"] == variant
    gate_up = {m.part(p) for m in mlps for p in ("gate_proj", "up_proj")}
    assert set(plan.thresholds) == (gate_up if variant == "relu-gate" else set())
    assert all(v == 0.0 for v in plan.thresholds.values())
    sp = mlp_sparsity(model, IDS)
    assert set(sp) == {m.part("down_proj") for m in mlps} and all(0.25 < v < 1.0 for v in sp.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_plan_compiled_equals_eager(variant):
    model = tiny("llama", num_hidden_layers=2)
    kw = {"shift": 0.05} if variant == "shifted-relu" else {}
    model, plan = actsparse.relufy(model, variant, tokens=IDS, **kw)
    assert set(plan.measured) == set(plan.rule(ExactZeros).modules_) and 0 < plan.target < 1
    ids, dec = IDS[:1, :5], IDS[:1, 5:8]
    want = prefill_decode(model, model, ids, dec)
    torch._dynamo.reset()
    be = actsparse.backend(plan)
    got = prefill_decode(torch.compile(model, backend=be), model, ids, dec)
    torch._dynamo.reset()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    downs = [s for s in be.sites if s.role == "mlp_down"]
    assert downs and all(s.rewritten for s in downs)
    assert all(("exact" if variant in ("relu", "shifted-relu") else "teal t=0") in s.rule for s in downs)


def test_plan_round_trips_and_fits_the_relufied_model(tmp_path):
    model, plan = actsparse.relufy(tiny("llama", num_hidden_layers=2), "shifted-relu", shift=0.1)
    back = actsparse.SparsityPlan.load(plan.save(tmp_path / "p.json"), model=model)
    assert back == plan and back.info["shifts"] == [0.1, 0.1]


def test_shift_calibrated_to_a_target_sparsity():
    model = tiny("llama", num_hidden_layers=2)
    model, plan = actsparse.relufy(model, "shifted-relu", tokens=IDS, sparsity=0.8)
    assert all(abs(v - 0.8) < 0.02 for v in plan.measured.values()), plan.measured
    assert len(plan.info["shifts"]) == 2


@pytest.mark.parametrize("kwargs, msg", [
    ({"variant": "gelu"}, "unknown variant 'gelu'; choose one of relu, relu-gate, shifted-relu, drelu"),
    ({"variant": "relu", "shift": 0.2}, "for variant 'shifted-relu'"),
    ({"variant": "drelu", "sparsity": 0.5}, "for variant 'shifted-relu'"),
    ({"variant": "shifted-relu", "shift": [0.1]}, "shift has 1 values, the model has 2 MLPs"),
    ({"variant": "shifted-relu", "shift": [0.1, float("nan")]}, "finite numbers"),
    ({"variant": "shifted-relu", "sparsity": 0.5}, "needs tokens"),
    ({"variant": "shifted-relu", "sparsity": 1.5, "tokens": IDS}, r"in \(0, 1\)"),
])
def test_bad_arguments_are_clear_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        actsparse.relufy(tiny("llama", num_hidden_layers=2), **kwargs)


def test_twice_and_ungated_models_are_refused():
    model, _ = actsparse.relufy(tiny("llama", num_hidden_layers=1))
    with pytest.raises(ValueError, match="already relufied"):
        actsparse.relufy(model, "drelu")
    with pytest.raises(ValueError, match="no gated MLP"):
        actsparse.relufy(tiny("gpt2", num_hidden_layers=1))


def test_plan_of_another_model_is_refused():
    _, plan = actsparse.relufy(tiny("llama", num_hidden_layers=2))
    with pytest.raises(PlanError):
        plan.validate(tiny("llama", num_hidden_layers=1))


@pytest.mark.parametrize("variant", ["shifted-relu", "relu-gate"])
def test_input_thresholds_on_top_of_the_exact_plan(variant):
    """TEAL thresholds on the linears the exact rule leaves dense; compiled == masked eager."""
    from actsparse.train import with_input_thresholds
    from tests.masking import assert_matches_masked

    kw = {"shift": 0.05} if variant == "shifted-relu" else {}
    model, plan = actsparse.relufy(tiny("llama", num_hidden_layers=2), variant, **kw)
    teal = actsparse.calibrate(model, IDS, method="teal", sparsity=0.5)
    before = copy.deepcopy((plan, teal))
    both = with_input_thresholds(plan, teal)
    assert (plan, teal) == before  # neither argument changed, nor shares a rule with the result
    assert all(both.rules[k] is not r for k, r in plan.rules.items() if k in both.rules)
    downs = set(plan.rule(ExactZeros).modules_)
    assert both.rule(ExactZeros).modules_ == plan.rule(ExactZeros).modules_
    assert not downs & set(both.thresholds) and set(both.thresholds) == (set(teal.thresholds) - downs)
    if variant == "relu-gate":  # the variant's own threshold-0 input masks are kept, not replaced
        assert all(both.thresholds[k] == 0.0 for k in plan.thresholds)
    both.validate(model)
    if variant == "relu-gate":  # the plan logic above is the variant's difference; compile one
        return
    be = actsparse.backend(both, compiler="eager")  # the rewrites, without Inductor's compile time
    assert_matches_masked(model, both, be, IDS[:1, :5], IDS[:1, 5:8])
    torch._dynamo.reset()
    roles = {s.role for s in be.sites if s.rewritten}
    assert "mlp_down" in roles and len(roles) > 1  # the down projections and the linears TEAL masks


def test_input_thresholds_refuse_bad_plans():
    from actsparse.train import with_input_thresholds

    model, plan = actsparse.relufy(tiny("llama", num_hidden_layers=2))
    teal = actsparse.calibrate(model, IDS, method="teal", sparsity=0.5)
    with pytest.raises(ValueError, match="no exact rule"):
        with_input_thresholds(teal, teal)
    downs_only = actsparse.SparsityPlan(thresholds={k: v for k, v in teal.thresholds.items() if "down" in k},
                                        model=teal.model)
    with pytest.raises(ValueError, match="no input threshold outside the exact rule"):
        with_input_thresholds(plan, downs_only)
    other = actsparse.calibrate(tiny("llama", num_hidden_layers=1), IDS, method="teal", sparsity=0.5)
    with pytest.raises(PlanError):
        with_input_thresholds(plan, other)
    with pytest.raises(TypeError):
        with_input_thresholds(plan, {"a": 1.0})
