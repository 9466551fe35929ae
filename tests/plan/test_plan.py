"""SparsityPlan on its own: building against a model, fingerprints, queries, shortcuts, equality, and
a property test of the loader on corrupted plan files."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.models import tiny
from actsparse.plan import (ActivationThresholds, InputThresholds, PlanError, Predictors, SparsityPlan, StatTopK,
                            fingerprint, linear_weights)
from tests.plan.builders import plan_dict, plan_tensors, spec

L0 = "model.layers.0"
Q, K, V, O = (f"{L0}.self_attn.{p}_proj" for p in "qkvo")
GATE, UP, DOWN = (f"{L0}.mlp.{p}_proj" for p in ("gate", "up", "down"))
DECODER_LINEARS = sorted([Q, K, V, O, GATE, UP, DOWN])


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", num_hidden_layers=1)


def _predictor_plan(model, **kw) -> SparsityPlan:
    """A predictor (random weights) on the one MLP of ``model``."""
    n, d = model.get_submodule(f"{L0}.mlp.gate_proj").weight.shape
    g = torch.Generator().manual_seed(0)
    s = spec(f"{L0}.mlp", rank=4, in_features=d, neurons=n, keep=n // 2)
    s.update(gate=GATE, up=UP)
    tensors = {f"{DOWN}.w1": torch.randn(4, d, generator=g), f"{DOWN}.w2": torch.randn(n, 4, generator=g),
               f"{DOWN}.b2": torch.zeros(n)}
    return SparsityPlan(predictors={DOWN: s}, predictor_tensors=tensors, model=fingerprint(model), **kw)


# ------------------------------------------------------------------ building against a model


def test_from_thresholds(llama):
    plan = SparsityPlan.from_thresholds(llama, {Q: 0.1, DOWN: 0.2}, activation_thresholds={DOWN: 0.3},
                                        method="teal", target=0.4, score="wina")
    assert plan.model == fingerprint(llama) and plan.model["architecture"] == "LlamaForCausalLM"
    assert plan.model["weights"] == linear_weights(llama)
    assert plan.thresholds == {Q: 0.1, DOWN: 0.2} and plan.score == "wina"
    assert plan.activation_thresholds == {DOWN: 0.3}
    assert (plan.method, plan.target) == ("teal", 0.4)
    plan.validate(llama)
    assert SparsityPlan.from_thresholds(llama, {}).is_empty


def test_from_thresholds_names_unknown_and_non_linear_modules(llama):
    with pytest.raises(PlanError, match=r"^plan names modules the model does not have: model.layers.9.mlp.down_proj$"):
        SparsityPlan.from_thresholds(llama, {"model.layers.9.mlp.down_proj": 0.1})
    with pytest.raises(PlanError, match=r"^plan names modules that are not linear layers: model.norm$"):
        SparsityPlan.from_thresholds(llama, {Q: 0.1}, activation_thresholds={"model.norm": 0.1})
    with pytest.raises(PlanError, match=r"does not have: bogus; modules that are not linear layers: "
                                        r"model.embed_tokens, model.norm$"):
        SparsityPlan.from_thresholds(llama, {"model.norm": 0.1, "bogus": 0.1, "model.embed_tokens": 0.2})


def test_from_thresholds_checks_values(llama):
    with pytest.raises(PlanError, match=rf"^thresholds\['{Q}'\] must be >= 0, got -1"):
        SparsityPlan.from_thresholds(llama, {Q: -1})
    with pytest.raises(PlanError, match=r"^thresholds must be a mapping \(a JSON object\), got list"):
        SparsityPlan.from_thresholds(llama, [(Q, 0.1)])
    with pytest.raises(PlanError, match=r"^activation_thresholds must be a mapping \(a JSON object\), got list"):
        SparsityPlan.from_thresholds(llama, {}, activation_thresholds=[(DOWN, 0.1)])
    with pytest.raises(PlanError, match=r"^score must be one of abs, wina, got 'l1'"):
        SparsityPlan.from_thresholds(llama, {}, score="l1")


def test_plan_for_another_model(llama):
    plan = SparsityPlan.from_thresholds(llama, {DOWN: 0.1})
    wider = tiny("llama", num_hidden_layers=1, intermediate_size=96)
    with pytest.raises(PlanError, match=rf"weight shapes differ\): {DOWN}: plan \[64, 112\] vs model \[64, 96\], "
                                        rf"{GATE}: plan \[112, 64\] vs model \[96, 64\]"):
        plan.validate(wider)
    with pytest.raises(PlanError, match=r"^plan was made for a LlamaForCausalLM model, not for Qwen2ForCausalLM$"):
        plan.validate(tiny("qwen2", num_hidden_layers=1))
    # another depth: the deeper model has every linear the plan knows, and more
    deeper = tiny("llama", num_hidden_layers=2)
    with pytest.raises(PlanError, match=r"weight shapes differ\): model.layers.1.mlp.down_proj: plan None vs "
                                        r"model \[64, 112\]"):
        plan.validate(deeper)
    with pytest.raises(PlanError, match="weight shapes differ"):
        SparsityPlan.from_thresholds(deeper, {DOWN: 0.1}).validate(llama)
    plan.check_fingerprint(fingerprint(llama))
    with pytest.raises(PlanError, match="weight shapes differ"):
        plan.check_fingerprint(fingerprint(wider))
    # a plan that records no model fits any model having its modules
    bare = SparsityPlan(thresholds={DOWN: 0.1})
    bare.validate(wider)
    bare.validate(deeper)
    bare.check_fingerprint(fingerprint(wider))


def test_check_weight_shapes(llama):
    plan = SparsityPlan.from_thresholds(llama, {DOWN: 0.1})
    plan.check_weight_shapes({DOWN: (64, 112), UP: torch.Size([112, 64])})  # a graph sees a part of the model
    plan.check_weight_shapes({})
    plan.check_weight_shapes({"some.other.linear": (3, 3)})  # not the plan's business
    with pytest.raises(PlanError, match=rf"weight shapes differ\): {UP}: plan \[112, 64\] vs model \[96, 64\]$"):
        plan.check_weight_shapes({DOWN: (64, 112), UP: (96, 64)})
    SparsityPlan(thresholds={DOWN: 0.1}).check_weight_shapes({DOWN: (1, 1)})  # no fingerprint: nothing to check


def test_validate_predictors(llama):
    plan = _predictor_plan(llama)
    plan.validate(llama)
    plan.thresholds[GATE] = 0.1
    with pytest.raises(PlanError, match=rf"a predictor and threshold rules on the same MLP: {DOWN}"):
        plan.validate(llama)
    plan = _predictor_plan(llama)
    del plan.predictor_tensors[f"{DOWN}.w1"]
    with pytest.raises(PlanError, match=rf"has no tensor '{DOWN}.w1'"):
        plan.validate(llama)
    plan = _predictor_plan(llama)
    plan.model = None
    with pytest.raises(PlanError, match=r"made for an MLP of 64 inputs and 112 neurons"):
        plan.validate(tiny("llama", num_hidden_layers=1, intermediate_size=96))


def test_statistical(llama):
    plan = SparsityPlan.statistical(0.4, llama, roles=("mlp_in",), distribution="gaussian")
    assert plan.stat_topk == StatTopK(0.4, ("mlp_in",), "gaussian")
    assert (plan.method, plan.target, plan.model) == ("stat-topk", 0.4, fingerprint(llama))
    assert SparsityPlan.statistical(0.4).model is None
    plan.validate(llama)
    with pytest.raises(PlanError, match=r"^stat_topk.sparsity must be a finite number, got True"):
        SparsityPlan.statistical(True)
    with pytest.raises(PlanError, match=r"^stat_topk.sparsity must be a finite number, got '0.5'"):
        SparsityPlan.statistical("0.5")
    with pytest.raises(PlanError, match=r"^stat_topk.roles must be a list, got str"):
        SparsityPlan.statistical(0.5, roles="mlp_in")


# ------------------------------------------------------------------ queries


def test_input_major_modules(llama):
    assert SparsityPlan(thresholds={Q: 0.1, DOWN: 0.0}).input_major_modules(llama) == sorted([Q, DOWN])
    assert SparsityPlan(activation_thresholds={DOWN: 0.1}).input_major_modules(llama) == [DOWN]
    # stat-topk masks every site: every decoder linear, not the LM head
    assert SparsityPlan.statistical(0.5).input_major_modules(llama) == DECODER_LINEARS
    assert SparsityPlan.statistical(0.0).input_major_modules(llama) == []
    assert _predictor_plan(llama).input_major_modules(llama) == [DOWN]  # gate and up stay row-major
    # names that are not nn.Linear are left out; kinds add up, sorted, without repeats
    plan = SparsityPlan(thresholds={"model.norm": 0.1, V: 0.1, DOWN: 0.1}, activation_thresholds={DOWN: 0.1})
    assert plan.input_major_modules(llama) == [DOWN, V]
    assert SparsityPlan().input_major_modules(llama) == []


def test_is_empty_and_rule_names(llama):
    assert SparsityPlan().is_empty and SparsityPlan().rule_names() == set()
    assert SparsityPlan(thresholds={}, activation_thresholds={}).is_empty
    assert SparsityPlan(score="wina").is_empty
    assert not SparsityPlan.statistical(0.5).is_empty and SparsityPlan.statistical(0.5).rule_names() == set()
    assert not SparsityPlan(thresholds={Q: 0.0}).is_empty
    plan = _predictor_plan(llama, thresholds={Q: 0.1, O: 0.1}, activation_thresholds={"mlp.down": 0.2},
                           stat_topk=StatTopK(0.3))
    assert not plan.is_empty
    assert plan.rule_names() == {Q, O, "mlp.down", DOWN}


def test_summary(llama):
    plan = SparsityPlan(thresholds={Q: 0.1, K: 0.1}, activation_thresholds={DOWN: 0.2}, stat_topk=StatTopK(0.4),
                        method="teal", target=0.5, overall_sparsity=0.4812)
    assert plan.summary() == ("SparsityPlan(method=teal, target=0.50, measured=0.481, 2 input thresholds, "
                              "1 activation thresholds, stat-topk s=0.40)")
    assert str(plan) == repr(plan) == plan.summary()
    assert SparsityPlan().summary() == "SparsityPlan(method=manual)"
    plan = SparsityPlan(thresholds={}, activation_thresholds={DOWN: 0.2})
    assert plan.summary() == "SparsityPlan(method=manual, 1 activation thresholds)"  # empty rules left out
    assert "1 MLP predictors" in _predictor_plan(llama).summary()


# ------------------------------------------------------------------ rules and shortcuts


def test_rule_and_add():
    plan = SparsityPlan(thresholds={Q: 0.1})
    assert plan.rule(InputThresholds) == InputThresholds({Q: 0.1})
    assert plan.rule(StatTopK) is None and plan.rule(Predictors) is None
    st_rule = plan.add(StatTopK(0.3))
    assert plan.rule(StatTopK) is st_rule
    assert plan.add(StatTopK(0.6)) is plan.rule(StatTopK) and plan.stat_topk.sparsity == 0.6  # replaces
    assert list(plan.rules) == ["thresholds", "stat_topk"]
    plan = SparsityPlan(rules=[ActivationThresholds({DOWN: 0.1}), StatTopK(0.2)])
    assert plan.activation_thresholds == {DOWN: 0.1} and plan.stat_topk == StatTopK(0.2)
    with pytest.raises(PlanError, match="^a plan holds Rule objects, got dict"):
        plan.add({"stat_topk": {"sparsity": 0.5}})
    with pytest.raises(PlanError, match="^a plan holds Rule objects, got float"):
        SparsityPlan(stat_topk=0.5)


def test_thresholds_shortcut():
    plan = SparsityPlan()
    assert plan.score == "abs"
    plan.thresholds[Q] = 0.1  # the live dict of a rule made on first use
    assert plan.rule(InputThresholds).values == {Q: 0.1}
    assert plan.to_dict()["thresholds"] == {Q: 0.1}
    plan = SparsityPlan(thresholds={Q: 0.1}, score="wina")
    plan.thresholds = {K: 1}
    assert plan.thresholds == {K: 1.0} and plan.score == "wina"  # the setter keeps the score
    with pytest.raises(PlanError, match=rf"^thresholds\['{K}'\] must be >= 0, got -1"):
        plan.thresholds = {K: -1}
    with pytest.raises(PlanError, match=r"^thresholds must be a mapping"):
        plan.thresholds = [(K, 0.1)]
    assert plan.thresholds == {K: 1.0}  # unchanged by a refused value


def test_activation_thresholds_shortcut():
    plan = SparsityPlan()
    assert plan.activation_thresholds == {}
    plan.activation_thresholds = {DOWN: 0}
    assert plan.activation_thresholds == {DOWN: 0.0} and plan.rule(ActivationThresholds).values == {DOWN: 0.0}
    # the old bug: a list gave a bare "dictionary update sequence element #0" error
    for bad in ([DOWN, 0.1], [(DOWN, 0.1)], "x"):
        with pytest.raises(PlanError, match=r"^activation_thresholds must be a mapping"):
            plan.activation_thresholds = bad
        with pytest.raises(PlanError, match=r"^activation_thresholds must be a mapping"):
            SparsityPlan(activation_thresholds=bad)
    with pytest.raises(PlanError, match=rf"^activation_thresholds\['{DOWN}'\] must be a finite number, got nan"):
        plan.activation_thresholds = {DOWN: math.nan}
    assert plan.activation_thresholds == {DOWN: 0.0}


def test_stat_topk_shortcut():
    plan = SparsityPlan.statistical(0.5)
    assert plan.stat_topk == StatTopK(0.5)
    plan.stat_topk = StatTopK(0.2, ("mlp_in",))
    assert plan.rule(StatTopK) == StatTopK(0.2, ("mlp_in",))
    plan.stat_topk = None
    assert plan.stat_topk is None and "stat_topk" not in plan.to_dict() and plan.is_empty
    plan.stat_topk = None  # removing twice is fine
    with pytest.raises(PlanError, match="^a plan holds Rule objects, got float"):
        plan.stat_topk = 0.5


def test_predictor_shortcuts(llama):
    plan = _predictor_plan(llama)
    tensors = dict(plan.predictor_tensors)
    assert set(tensors) == {f"{DOWN}.w1", f"{DOWN}.w2", f"{DOWN}.b2"}
    assert plan.predictors[DOWN]["gate"] == GATE
    assert plan.tensors().keys() == {f"predictors/{k}" for k in tensors}
    plan.predictor_tensors = {k: v * 2 for k, v in tensors.items()}
    assert torch.equal(plan.rule(Predictors).weights[f"{DOWN}.b2"], tensors[f"{DOWN}.b2"] * 2)
    with pytest.raises(PlanError, match="^predictor tensors must be torch.Tensors, got list"):
        plan.predictor_tensors = {k: v.tolist() for k, v in tensors.items()}
    with pytest.raises(PlanError, match="^predictor tensors must be a mapping"):
        plan.predictor_tensors = list(tensors.values())
    fresh = SparsityPlan()
    assert fresh.predictor_tensors == {} and fresh.predictors == {}


# ------------------------------------------------------------------ equality


def test_equality(llama):
    a = SparsityPlan(thresholds={Q: 0.1}, stat_topk=StatTopK(0.3), measured={Q: 0.2}, info={"seed": 1})
    b = SparsityPlan(thresholds={Q: 0.1}, stat_topk=StatTopK(0.3), measured={Q: 0.2}, info={"seed": 1})
    assert a == b and not a != b
    for change in (lambda p: p.thresholds.update({Q: 0.2}), lambda p: setattr(p, "stat_topk", None),
                   lambda p: setattr(p, "method", "teal"), lambda p: p.info.update(seed=2),
                   lambda p: setattr(p, "model", fingerprint(llama)), lambda p: p.roles.update({Q: "attn_in"}),
                   lambda p: p.add(InputThresholds({Q: 0.1}, "wina"))):
        c = SparsityPlan.from_dict(a.to_dict())
        assert c == a
        change(c)
        assert c != a
    assert a != "plan" and a.__eq__(1) is NotImplemented
    with pytest.raises(TypeError):
        hash(a)
    p, q = _predictor_plan(llama), _predictor_plan(llama)
    assert p == q
    q.predictor_tensors[f"{DOWN}.b2"] = torch.ones_like(q.predictor_tensors[f"{DOWN}.b2"])
    assert p != q


def test_equality_ignores_empty_rules():
    # reading a shortcut adds an empty rule: it must not change what the plan is
    a, b = SparsityPlan.statistical(0.5), SparsityPlan.statistical(0.5)
    assert a.thresholds == {} and a.activation_thresholds == {} and a.predictor_tensors == {}
    assert a == b and b == a
    assert SparsityPlan(thresholds={}) == SparsityPlan()
    assert SparsityPlan(thresholds={Q: 0.0}) != SparsityPlan()


# ------------------------------------------------------------------ from_dict's meta fields


@pytest.mark.parametrize("field, value, expected", [
    ("method", 3, r"^method must be a string, got int"),
    ("target", 1.5, r"^target must be <= 1, got 1.5"),
    ("target", True, r"^target must be a finite number, got True"),
    ("target", 10**400, r"^target must be a finite number"),
    ("overall_sparsity", -0.1, r"^overall_sparsity must be >= 0, got -0.1"),
    ("overall_sparsity", "0.5", r"^overall_sparsity must be a finite number, got '0.5'"),
    ("roles", False, r"^roles must be a mapping \(a JSON object\), got bool"),
    ("roles", [], r"^roles must be a mapping \(a JSON object\), got list"),
    ("roles", {"attn.q": 1}, r"^roles\['attn.q'\] must be a string, got int"),
    ("measured", 0, r"^measured must be a mapping \(a JSON object\), got int"),
    ("measured", {"attn.q": 2}, r"^measured\['attn.q'\] must be <= 1, got 2"),
    ("measured", {"attn.q": 10**400}, r"^measured\['attn.q'\] must be a finite number"),
    ("info", "", r"^info must be a mapping \(a JSON object\), got str"),
    ("info", [["seed", 0]], r"^info must be a mapping \(a JSON object\), got list"),
    ("model", [], r"^model must be a mapping \(a JSON object\), got list"),
    ("model", {"weights": {}}, r"^model.architecture must be a string, got NoneType"),
    ("model", {"architecture": "X", "weights": None}, r"^model.weights must be a mapping"),
    ("model", {"architecture": "X", "weights": {"a": 3}}, r"^model.weights\['a'\] must be a list, got int"),
    ("model", {"architecture": "X", "weights": {"a": [3, -1]}}, r"^model.weights\['a'\] must be an integer >= 0"),
    ("model", {"architecture": "X", "weights": {"a": [3, True]}}, r"^model.weights\['a'\] must be an integer, got"),
    ("model", {"architecture": "X", "weights": {"a": [3, 10**400]}}, r"^model.weights\['a'\] must be an integer of "
                                                                     r"at most 64 bits, got 1000"),
])
def test_from_dict_meta_rejects(field, value, expected):
    d = plan_dict()
    d[field] = value
    with pytest.raises(PlanError, match=expected):
        SparsityPlan.from_dict(d, plan_tensors())


def test_from_dict_reads_null_meta_as_empty():
    d = plan_dict()
    d.update(roles=None, measured=None, info=None, model=None, target=None, overall_sparsity=None)
    for f in ("method", "score"):
        del d[f]
    plan = SparsityPlan.from_dict(d, plan_tensors())
    assert (plan.roles, plan.measured, plan.info, plan.model) == ({}, {}, {}, None)
    assert (plan.method, plan.score, plan.target) == ("manual", "abs", None)


def test_from_dict_round_trip():
    plan = SparsityPlan.from_dict(plan_dict(), plan_tensors())
    assert plan.to_dict() == {**plan_dict(), "thresholds": {"attn.q": 0.1, "attn.o": 0.0}}
    assert SparsityPlan.from_dict(plan.to_dict(), plan.tensors()) == plan
    with pytest.raises(PlanError, match=r"predictors\['mlp2.down'\] has no tensor 'mlp2.down.w1'"):
        SparsityPlan.from_dict(plan_dict())  # a predictor without its tensors
    with pytest.raises(PlanError, match=r"^the plan file must be a mapping \(a JSON object\), got list"):
        SparsityPlan.from_dict([])
    d = plan_dict()
    d["activation_thresholds"] = {"mlp2.down": 0.1}
    with pytest.raises(PlanError, match="one or the other"):
        SparsityPlan.from_dict(d, plan_tensors())


# ------------------------------------------------------------------ the loader on corrupted plans


def _paths(obj, prefix=()):
    """Every place in a JSON tree, outermost first (the root itself excluded)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


PATHS = list(_paths(plan_dict()))
TENSORS = plan_tensors()
DELETE = object()
WRONG = [None, True, False, "bogus", "", [], [1, "x"], [["attn.q", 0.1]], {}, {"k": 1}, {"sparsity": "x"},
         float("nan"), float("inf"), -1, -0.5, 0, 10**400, 2**63, DELETE]


def _corrupt(d, path, value) -> bool:
    """Put ``value`` at ``path`` in ``d`` (or delete what is there); False if the path is gone."""
    node = d
    for k in path[:-1]:
        if not (isinstance(node, dict) and k in node) and not (isinstance(node, list) and k < len(node)):
            return False
        node = node[k]
    k = path[-1]
    if not (isinstance(node, dict) and k in node) and not (isinstance(node, list) and k < len(node)):
        return False
    if value is DELETE:
        del node[k]
    else:
        node[k] = copy.deepcopy(value)
    return True


def _load_or_plan_error(d, roots) -> str:
    """from_dict on a corrupted plan: a plan, or a PlanError naming a corrupted field; never another error."""
    try:
        plan = SparsityPlan.from_dict(d, TENSORS)
    except PlanError as e:  # anything else (ValueError, TypeError, OverflowError, ...) fails the test
        assert any(r in str(e) for r in roots), f"{e} names none of the corrupted fields {sorted(roots)}"
        return "PlanError"
    # what it accepts, it writes back as a plan that reads the same
    assert SparsityPlan.from_dict(plan.to_dict(), plan.tensors()) == plan
    return "plan"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(WRONG)), min_size=1, max_size=3))
def test_loader_on_corrupted_plans(corruptions):
    d = plan_dict()
    roots = {path[0] for path, value in corruptions if _corrupt(d, path, value)}
    _load_or_plan_error(d, roots)


def test_loader_on_every_single_corruption():
    """Each wrong value at each place, once; and the corruptions both pass and fail (not vacuous)."""
    outcomes = set()
    for path in PATHS:
        for value in WRONG:
            d = plan_dict()
            assert _corrupt(d, path, value)
            outcomes.add(_load_or_plan_error(d, {path[0]}))
    assert outcomes == {"plan", "PlanError"}
