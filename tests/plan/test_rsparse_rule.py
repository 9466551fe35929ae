"""The ``rsparse`` rule kind (sparse + low-rank): validation, JSON, sidecar round trip, model check."""

from __future__ import annotations

import pytest
import torch

from actsparse.models import tiny
from actsparse.plan import RULE_KINDS, PlanError, SparsityPlan, fingerprint
from actsparse.plan.rules.rsparse import LowRankSparse


def _rule(rank: int = 2, n: int = 6, k: int = 4) -> LowRankSparse:
    g = torch.Generator().manual_seed(0)
    specs = {"a.lin": {"threshold": 0.3, "sparsity": 0.5, "rank": rank, "in_features": k, "out_features": n},
             "b.lin": {"threshold": 0.1, "sparsity": 0.2, "rank": 0, "in_features": k, "out_features": n}}
    tensors = {} if rank == 0 else {"a.lin.a": torch.randn(n, rank, generator=g),
                                    "a.lin.b": torch.randn(rank, k, generator=g)}
    return LowRankSparse(specs, tensors)


def test_registered_json_and_queries():
    assert RULE_KINDS["rsparse"] is LowRankSparse
    r = _rule()
    assert LowRankSparse.from_json(r.to_json()).specs == r.specs and LowRankSparse.from_json({}) is None
    assert r.modules() == r.input_major_modules([]) == {"a.lin", "b.lin"}
    assert r.pair("b.lin") is None and r.pair("a.lin")[0].shape == (6, 2)
    assert r.lowrank_params() == 2 * (4 + 6) and "1 with rank > 0" in r.describe()


@pytest.mark.parametrize("change, msg", [({"rank": 7}, "at most min"), ({"threshold": -1.0}, ">= 0"),
                                         ({"sparsity": 1.5}, "<= 1"), ({"extra": 1}, "unknown extra"),
                                         ({"rank": 1.5}, "rank")])
def test_malformed_entries_are_plan_errors(change, msg):
    spec = {"threshold": 0.3, "sparsity": 0.5, "rank": 2, "in_features": 4, "out_features": 6, **change}
    with pytest.raises(PlanError, match=msg):
        LowRankSparse({"a.lin": spec}, {"a.lin.a": torch.zeros(6, 2), "a.lin.b": torch.zeros(2, 4)}).check_tensors()


def test_factor_tensors_are_checked():
    r = _rule()
    with pytest.raises(PlanError, match="has no tensor 'a.lin.b'"):
        LowRankSparse(r.specs, {"a.lin.a": r.factors["a.lin.a"]}).check_tensors()
    with pytest.raises(PlanError, match="must have shape"):
        LowRankSparse(r.specs, {**r.factors, "a.lin.b": torch.zeros(3, 4)}).check_tensors()
    with pytest.raises(PlanError, match="belong to no linear"):
        LowRankSparse(r.specs, {**r.factors, "b.lin.a": torch.zeros(6, 1)}).check_tensors()


def test_plan_file_round_trip_and_model_check(tmp_path):
    model = tiny("llama", num_hidden_layers=1)
    q = model.model.layers[0].self_attn.q_proj
    n, k = q.weight.shape
    spec = {"threshold": 0.2, "sparsity": 0.4, "rank": 3, "in_features": k, "out_features": n}
    rule = LowRankSparse({"model.layers.0.self_attn.q_proj": spec},
                         {"model.layers.0.self_attn.q_proj.a": torch.randn(n, 3),
                          "model.layers.0.self_attn.q_proj.b": torch.randn(3, k)})
    plan = SparsityPlan(rules=[rule], method="rsparse", target=0.4, model=fingerprint(model))
    plan.validate(model)
    path = plan.save(tmp_path / "plan.json")
    back = SparsityPlan.load(path, model=model)
    assert back == plan and sorted(back.tensors()) == ["rsparse/model.layers.0.self_attn.q_proj.a",
                                                       "rsparse/model.layers.0.self_attn.q_proj.b"]
    assert back.input_major_modules(model) == ["model.layers.0.self_attn.q_proj"]
    other = SparsityPlan(rules=[LowRankSparse({"model.layers.0.self_attn.q_proj": {**spec, "in_features": k + 1}},
                                              {"model.layers.0.self_attn.q_proj.a": torch.randn(n, 3),
                                               "model.layers.0.self_attn.q_proj.b": torch.randn(3, k + 1)})])
    with pytest.raises(PlanError, match="linear; the model's weight has shape"):
        other.validate(model)
    with pytest.raises(PlanError):
        SparsityPlan.load(path, model=tiny("llama", num_hidden_layers=2))
