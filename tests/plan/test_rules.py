"""Rule kinds on their own: construction, JSON round trip, malformed fields, queries, the registry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from actsparse.plan import (DISTRIBUTIONS, ROLES, RULE_KINDS, ActivationThresholds, InputThresholds, PlanError,
                            Predictors, Rule, SparsityPlan, StatTopK, normal_ppf, register_rule)
from actsparse.plan.rules import check_predictor_clash, rule_fields
from tests.plan.builders import D, N, RANK, predictor_tensors, predictors, spec

LINEARS = ["attn.q", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
HUGE = 10**400  # an int no float holds

# ------------------------------------------------------------------ threshold maps (TEAL, CATS)

MAP_KINDS = [(InputThresholds, "thresholds"), (ActivationThresholds, "activation_thresholds")]


@pytest.mark.parametrize("kind, name", MAP_KINDS)
def test_threshold_map_round_trip(kind, name):
    r = kind({"a": 0.1, "b": 0, "c": 3})
    assert r.values == {"a": 0.1, "b": 0.0, "c": 3.0}
    assert all(type(v) is float for v in r.values.values())
    js = r.to_json()
    assert js[name] == {"a": 0.1, "b": 0.0, "c": 3.0}
    assert set(js) == set(kind.fields)
    assert kind.from_json(js) == r
    assert kind.from_json({}) is None
    assert r.modules() == {"a", "b", "c"} and not r.is_empty()
    assert r.input_major_modules(LINEARS) == {"a", "b", "c"}  # named modules only, not every linear
    assert kind().is_empty() and kind().modules() == set()


@pytest.mark.parametrize("kind, name", MAP_KINDS)
@pytest.mark.parametrize("values, expected", [
    ({"a": -0.1}, r"\['a'\] must be >= 0, got -0.1"),
    ({"a": True}, r"\['a'\] must be a finite number, got True"),
    ({"a": float("nan")}, r"\['a'\] must be a finite number, got nan"),
    ({"a": float("inf")}, r"\['a'\] must be a finite number, got inf"),
    ({"a": HUGE}, r"\['a'\] must be a finite number, got 1000"),
    ({"a": "0.1"}, r"\['a'\] must be a finite number, got '0.1'"),
    ({"a": None}, r"\['a'\] must be a finite number, got None"),
    ({"a": [0.1]}, r"\['a'\] must be a finite number, got \[0.1\]"),
    ({1: 0.1}, r" must have string keys, got 1"),
    ([("a", 0.1)], r" must be a mapping \(a JSON object\), got list"),
    ("a", r" must be a mapping \(a JSON object\), got str"),
])
def test_threshold_map_rejects(kind, name, values, expected):
    with pytest.raises(PlanError, match="^" + name + expected):
        kind(values)
    with pytest.raises(PlanError, match="^" + name + expected):
        kind.from_json({name: values})


def test_huge_number_message_is_short():
    with pytest.raises(PlanError) as e:
        InputThresholds({"a": 10**5000})  # repr() of this int itself raises ValueError
    assert "must be a finite number" in str(e.value) and len(str(e.value)) < 120


def test_input_thresholds_score():
    r = InputThresholds({"a": 0.1}, "wina")
    assert r.to_json() == {"thresholds": {"a": 0.1}, "score": "wina"}
    assert r.describe() == "1 input thresholds on |x|*||W col||"
    assert InputThresholds({"a": 0.1, "b": 0.2}).describe() == "2 input thresholds"
    # a file with only a non-default score still has the rule (empty), one without either has none
    assert InputThresholds.from_json({"score": "wina"}) == InputThresholds({}, "wina")
    assert InputThresholds.from_json({"score": "abs"}) is None
    with pytest.raises(PlanError, match=r"^score must be one of abs, wina, got 'l2'"):
        InputThresholds({}, "l2")
    with pytest.raises(PlanError, match=r"^score must be a string, got int"):
        InputThresholds.from_json({"thresholds": {}, "score": 1})
    with pytest.raises(PlanError, match=r"^score must be a string, got NoneType"):
        InputThresholds.from_json({"score": None})


def test_activation_thresholds_describe():
    assert ActivationThresholds({"mlp.down": 0.2}).describe() == "1 activation thresholds"


# ------------------------------------------------------------------ statistical top-k


def test_stat_topk_round_trip_and_queries():
    r = StatTopK(0.4, ["attn_in", "mlp_down"], "gaussian")
    assert r.roles == ("attn_in", "mlp_down")  # a list from JSON becomes a tuple
    js = r.to_json()
    assert js == {"stat_topk": {"sparsity": 0.4, "roles": ["attn_in", "mlp_down"], "distribution": "gaussian"}}
    assert StatTopK.from_json(js) == r
    assert StatTopK.from_json({}) is None
    assert StatTopK.from_json({"stat_topk": {"sparsity": 0.3}}) == StatTopK(0.3, ROLES, "laplace")
    assert r.modules() == set() and not r.is_empty()  # it applies by role, to every site
    assert r.input_major_modules(LINEARS) == set(LINEARS)
    assert StatTopK(0.0).input_major_modules(LINEARS) == set()  # nothing is skipped at 0
    assert r.describe() == "stat-topk s=0.40"
    assert StatTopK(0).sparsity == 0.0 and type(StatTopK(0).sparsity) is float


def test_stat_topk_multiplier():
    # laplace: P(|x| <= c) = 1 - exp(-c / mean|x|)
    assert StatTopK(0.5).multiplier == pytest.approx(math.log(2))
    assert StatTopK(0.0).multiplier == 0.0
    # gaussian: Phi^-1((1 + s) / 2) * sqrt(pi / 2)
    assert StatTopK(0.5, distribution="gaussian").multiplier == pytest.approx(0.6744898 * math.sqrt(math.pi / 2))
    assert normal_ppf(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert normal_ppf(0.5) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        normal_ppf(1.0)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(sparsity=-0.1), r"stat_topk.sparsity must be >= 0, got -0.1"),
    (dict(sparsity=1.0), r"stat_topk.sparsity must be < 1, got 1.0"),
    (dict(sparsity=1), r"stat_topk.sparsity must be < 1, got 1"),
    (dict(sparsity=True), r"stat_topk.sparsity must be a finite number, got True"),
    (dict(sparsity=float("nan")), r"stat_topk.sparsity must be a finite number, got nan"),
    (dict(sparsity=HUGE), r"stat_topk.sparsity must be a finite number"),
    (dict(sparsity="0.5"), r"stat_topk.sparsity must be a finite number, got '0.5'"),
    (dict(sparsity=None), r"stat_topk.sparsity must be a finite number, got None"),
    (dict(sparsity=0.5, roles=["bogus", "mlp_in"]), r"stat_topk.roles must be a list of roles among "
                                                    r"attn_in, attn_out, mlp_in, mlp_down, got unknown \['bogus'\]"),
    (dict(sparsity=0.5, roles="mlp_in"), r"stat_topk.roles must be a list, got str"),
    (dict(sparsity=0.5, roles={"mlp_in": 1}), r"stat_topk.roles must be a list, got dict"),
    (dict(sparsity=0.5, roles=[None]), r"stat_topk.roles must be .*got unknown \[None\]"),
    (dict(sparsity=0.5, distribution="uniform"), r"stat_topk.distribution must be one of laplace, gaussian, "
                                                 r"got 'uniform'"),
    (dict(sparsity=0.5, distribution=0), r"stat_topk.distribution must be a string, got int"),
])
def test_stat_topk_rejects(kwargs, expected):
    with pytest.raises(PlanError, match="^" + expected):
        StatTopK(**kwargs)
    with pytest.raises(PlanError, match="^" + expected):
        StatTopK.from_json({"stat_topk": kwargs})


@pytest.mark.parametrize("value, expected", [
    ([0.5], r"stat_topk must be a mapping \(a JSON object\), got list"),
    (0.5, r"stat_topk must be a mapping \(a JSON object\), got float"),
    ({"roles": ["mlp_in"]}, r"stat_topk must have a 'sparsity' field"),
    ({"sparsity": 0.5, "distrbution": "gaussian"}, r"stat_topk must have only the fields sparsity, roles, "
                                                   r"distribution; got unknown \['distrbution'\]"),
])
def test_stat_topk_json_rejects(value, expected):
    with pytest.raises(PlanError, match="^" + expected):
        StatTopK.from_json({"stat_topk": value})


def test_distributions_all_accepted():
    for dist in DISTRIBUTIONS:
        assert 0 < StatTopK(0.5, distribution=dist).multiplier < 2


# ------------------------------------------------------------------ predictors


def test_predictors_round_trip_and_queries():
    r = predictors()
    js = r.to_json()
    assert js == {"predictors": {"mlp.down": spec()}}  # JSON only: the weights go to the sidecar
    back = Predictors.from_json(js)
    assert back.specs == r.specs and back.weights == {}
    back.load_tensors(r.tensors())
    assert back.specs == r.specs and back.weights.keys() == r.weights.keys()
    assert all(torch.equal(back.weights[k], r.weights[k]) for k in r.weights)
    assert Predictors.from_json({}) is None
    assert list(r.tensors()) == sorted(["mlp.down.w1", "mlp.down.w2", "mlp.down.b2"])
    assert r.modules() == {"mlp.down"} and not r.is_empty()
    assert r.input_major_modules(LINEARS) == {"mlp.down"}  # gate and up stay row-major
    assert r.claimed() == {"mlp.down": "mlp.down", "mlp.gate": "mlp.down", "mlp.up": "mlp.down"}
    assert r.describe() == "1 MLP predictors"
    assert Predictors().is_empty() and Predictors.has_tensors and not InputThresholds.has_tensors
    assert Predictors({"mlp.down": spec(selection="threshold", keep=N)}).specs["mlp.down"]["keep"] == N


@pytest.mark.parametrize("key", ["gate", "up", "act", "rank", "in_features", "neurons", "selection", "keep",
                                 "threshold"])
def test_predictor_spec_missing_key(key):
    s = spec()
    del s[key]
    with pytest.raises(PlanError, match=rf"^predictors\['x'\] must have the keys gate, up, .*; it lacks {key}$"):
        Predictors({"x": s})


@pytest.mark.parametrize("key", ["rank", "in_features", "neurons", "keep"])
@pytest.mark.parametrize("value, expected", [
    (True, "an integer, got True"), (2.0, "an integer, got 2.0"), ("2", "an integer, got '2'"),
    (None, "an integer, got None"), (0, "an integer >= 1, got 0"), (-3, "an integer >= 1, got -3"),
    (2**64, "an integer of at most 64 bits, got 18446744073709551616"), (HUGE, r"an integer of at most 64 bits"),
])
def test_predictor_spec_bad_int(key, value, expected):
    with pytest.raises(PlanError, match=rf"^predictors\['x'\]\['{key}'\] must be {expected}"):
        Predictors({"x": spec(**{key: value})})


@pytest.mark.parametrize("changes, expected", [
    (dict(keep=N + 1), rf"\['keep'\] must be at most neurons \({N}\), got {N + 1}"),
    (dict(selection="sometimes"), r"\['selection'\] must be one of topk, threshold, got 'sometimes'"),
    (dict(selection=1), r"\['selection'\] must be a string, got int"),
    (dict(gate=None), r"\['gate'\] must be a string, got NoneType"),
    (dict(up=["mlp.up"]), r"\['up'\] must be a string, got list"),
    (dict(act=1.0), r"\['act'\] must be a string, got float"),
    (dict(threshold=float("nan")), r"\['threshold'\] must be a finite number, got nan"),
    (dict(threshold=False), r"\['threshold'\] must be a finite number, got False"),
    (dict(threshold="0.2"), r"\['threshold'\] must be a finite number, got '0.2'"),
])
def test_predictor_spec_rejects(changes, expected):
    with pytest.raises(PlanError, match=r"^predictors\['x'\]" + expected):
        Predictors({"x": spec(**changes)})


def test_predictor_specs_and_weights_types():
    with pytest.raises(PlanError, match=r"^predictors must be a mapping \(a JSON object\), got list"):
        Predictors([spec()])
    with pytest.raises(PlanError, match=r"^predictors\['x'\] must be a mapping \(a JSON object\), got str"):
        Predictors({"x": "mlp.gate"})
    with pytest.raises(PlanError, match=r"^predictor tensors must be a mapping .*got list"):
        Predictors({}, [torch.zeros(1)])
    with pytest.raises(PlanError, match=r"^predictor tensors must be torch.Tensors, got list for mlp.down.b2"):
        Predictors({"mlp.down": spec()}, {**predictor_tensors(), "mlp.down.b2": [0.0] * N})


def test_predictor_tensors_checked():
    r = predictors()
    r.check_tensors()
    del r.weights["mlp.down.w2"]
    with pytest.raises(PlanError, match=r"^predictors\['mlp.down'\] has no tensor 'mlp.down.w2'"):
        r.check_tensors()
    with pytest.raises(PlanError, match="has no tensor"):
        r.tensors()  # so a plan is never saved without them
    r.weights["mlp.down.w2"] = torch.zeros(N, RANK + 1)
    with pytest.raises(PlanError, match=rf"^predictors\['mlp.down'\]: tensor 'mlp.down.w2' must have shape "
                                        rf"\[{N}, {RANK}\], got \[{N}, {RANK + 1}\]"):
        r.check_tensors()
    r = predictors()
    r.weights["other.down.w1"] = torch.zeros(RANK, D)  # e.g. the sidecar of another plan
    with pytest.raises(PlanError, match=r"^predictors: tensors other.down.w1 belong to no predictor"):
        r.check_tensors()
    with pytest.raises(PlanError, match="has no tensor 'mlp.down.w1'"):
        Predictors.from_json({"predictors": {"mlp.down": spec()}}).load_tensors({})


def test_predictor_check_against_model_shapes():
    shapes = {"mlp.gate": [N, D], "mlp.up": [N, D], "mlp.down": [D, N]}
    predictors().check(shapes)
    with pytest.raises(PlanError, match=r"the model has no linear 'mlp.up'"):
        predictors().check({"mlp.gate": [N, D]})
    with pytest.raises(PlanError, match=rf"made for an MLP of {D} inputs and {N} neurons; mlp.gate has weight "
                                        rf"shape \[{N + 1}, {D}\]"):
        predictors().check({**shapes, "mlp.gate": [N + 1, D]})


def test_predictor_clash():
    p = predictors()
    check_predictor_clash(p, {"attn.q"}, {"mlp2.down"})
    for thresholds, acts in [({"mlp.gate"}, set()), ({"mlp.down"}, set()), (set(), {"mlp.down"})]:
        with pytest.raises(PlanError, match=r"on the same MLP: mlp.down; an MLP takes one or the other"):
            check_predictor_clash(p, thresholds, acts)


# ------------------------------------------------------------------ the base class and the registry


def test_registry_holds_the_kinds():
    assert RULE_KINDS["thresholds"] is InputThresholds
    assert RULE_KINDS["activation_thresholds"] is ActivationThresholds
    assert RULE_KINDS["stat_topk"] is StatTopK
    assert RULE_KINDS["predictors"] is Predictors
    assert {"thresholds", "score", "activation_thresholds", "stat_topk", "predictors"} <= rule_fields()
    for kind, cls in RULE_KINDS.items():
        assert cls.kind == kind and issubclass(cls, Rule)
    fields = [f for cls in RULE_KINDS.values() for f in cls.fields]
    assert len(fields) == len(set(fields))  # every field has one owner


@pytest.fixture
def registry():
    """Register kinds in the test, then restore the registry as it was."""
    saved = dict(RULE_KINDS)
    yield RULE_KINDS
    RULE_KINDS.clear()
    RULE_KINDS.update(saved)


def _kind(kind: str, fields: tuple[str, ...], name: str = "Custom") -> type[Rule]:
    return type(name, (Rule,), {"kind": kind, "fields": fields})


@pytest.mark.parametrize("kind, fields, expected", [
    ("mine", ("mine", "score"), r"Custom: plan fields \['score'\] already belong to another rule kind "
                                r"\(InputThresholds\)"),
    ("mine", ("stat_topk",), r"fields \['stat_topk'\] already belong to another rule kind \(StatTopK\)"),
    ("predictors", ("mine",), r"Custom: rule kind 'predictors' is already Predictors"),
    ("mine", ("info",), r"plan fields \['info'\] belong to the plan itself"),
    ("mine", ("tensors",), r"plan fields \['tensors'\] belong to the plan itself"),
    ("mine", ("predictor_file",), r"belong to the plan itself"),
    ("my/kind", ("mine",), r"kind must be a string without '/'"),
    ("", ("mine",), r"must set kind and fields"),
    ("mine", (), r"must set kind and fields"),
    ("mine", "mine", r"fields must be a tuple of strings"),
])
def test_register_refuses(registry, kind, fields, expected):
    before = dict(registry)
    with pytest.raises(TypeError, match=expected):
        register_rule(_kind(kind, fields))
    assert registry == before


def test_register_refuses_non_rules(registry):
    with pytest.raises(TypeError, match="takes a Rule subclass"):
        register_rule(dict)


def test_register_again_replaces_the_same_class(registry):
    first = register_rule(_kind("mine", ("mine",)))
    again = register_rule(_kind("mine", ("mine",)))  # e.g. its module reloaded
    assert registry["mine"] is again is not first
    assert register_rule(again) is again and registry["mine"] is again


@dataclass
class Tagged(Rule):
    """A new rule kind, as another module would add one: module -> tag."""

    kind = "tags"
    fields = ("tags",)

    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data):
        return None if data.get("tags") is None else cls(dict(data["tags"]))

    def to_json(self):
        return {"tags": dict(self.tags)}

    def modules(self):
        return set(self.tags)


def test_registered_kind_is_read_and_written_by_plans(registry, tmp_path):
    d = {"format": "actsparse-plan", "version": 2, "tags": {"attn.q": "x"}}
    with pytest.raises(PlanError, match=r"unknown plan field\(s\) \['tags'\]"):
        SparsityPlan.from_dict(d)
    register_rule(Tagged)
    plan = SparsityPlan.from_dict(d)
    assert plan.rule(Tagged) == Tagged({"attn.q": "x"})
    assert plan.rule_names() == {"attn.q"} and not plan.is_empty
    assert plan.summary() == "SparsityPlan(method=manual, tags)"  # Rule.describe: the kind
    assert SparsityPlan.load(plan.save(tmp_path / "p.json")) == plan


def test_base_rule_defaults():
    r = _kind("base", ("base",))()
    assert r.modules() == set() and r.is_empty() and r.input_major_modules(LINEARS) == set()
    assert r.tensors() == {} and r.describe() == "base"
    r.check({})
    r.load_tensors({})
    with pytest.raises(NotImplementedError):
        r.to_json()
    with pytest.raises(NotImplementedError):
        Rule.from_json({})
