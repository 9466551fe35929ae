"""The ``exact`` rule kind: validation, JSON, plan file round trip."""

from __future__ import annotations

import pytest

import actsparse
from actsparse.models import tiny
from actsparse.plan import RULE_KINDS, PlanError, SparsityPlan
from actsparse.plan.rules.exact import ExactZeros


def test_registered_and_round_trips_as_json():
    assert RULE_KINDS["exact"] is ExactZeros
    r = ExactZeros(["b.down", "a.down"])
    assert r.modules_ == ["a.down", "b.down"] and r.to_json() == {"exact": ["a.down", "b.down"]}
    assert ExactZeros.from_json(r.to_json()) == r and ExactZeros.from_json({}) is None
    assert r.input_major_modules(["x"]) == {"a.down", "b.down"}
    assert ExactZeros().is_empty()


@pytest.mark.parametrize("bad, msg", [("a.down", "list of module names"), ({"a": 1}, "list of module names"),
                                      (["a", 3], "non-empty module names"), ([""], "non-empty"),
                                      (["a", "a"], "more than once"), (7, "list of module names")])
def test_malformed_is_a_plan_error(bad, msg):
    with pytest.raises(PlanError, match=msg):
        ExactZeros(bad)


def test_plan_file_round_trip_and_model_check(tmp_path):
    model = tiny("llama", hidden_act="relu", num_hidden_layers=2)
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    plan = SparsityPlan.from_thresholds(model, {"model.layers.0.self_attn.q_proj": 0.1}, method="relufy")
    plan.add(ExactZeros(downs))
    path = plan.save(tmp_path / "plan.json")
    back = SparsityPlan.load(path, model=model)
    assert back == plan and back.rule(ExactZeros).modules_ == downs
    assert "2 exact-zero MLPs" in back.summary()
    assert back.input_major_modules(model) == sorted(downs + ["model.layers.0.self_attn.q_proj"])
    other = tiny("llama", hidden_act="relu", num_hidden_layers=1)
    with pytest.raises(PlanError):
        SparsityPlan.load(path, model=other)


def test_unknown_module_fails_validation():
    model = tiny("llama", hidden_act="relu", num_hidden_layers=1)
    plan = actsparse.SparsityPlan(rules=[ExactZeros(["model.layers.9.mlp.down_proj"])])
    with pytest.raises(PlanError, match="does not have"):
        plan.validate(model)
