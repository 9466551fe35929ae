"""A plan under tensor parallelism: slices, the degree check and the rule kinds refused (no processes)."""

from __future__ import annotations

import pytest

import actsparse
from actsparse.calibration.heads import random_head_routing
from actsparse.distributed import check_degree, tp_styles
from actsparse.models import tiny
from actsparse.plan import PlanError, SparsityPlan, StatTopK, linear_weights
from actsparse.plan.sharding import Shard, ShardedSite, check_plan_for_degree, check_sharded_sites, valid_degrees
from tests.masking import linear_names

# tiny llama: hidden 64, 4 heads of 16 (2 KV heads), MLP width 112
Q, K, O, GATE, DOWN = (f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"))


def test_shard_slices():
    col, row = Shard(0, 1, 4), Shard(1, 3, 4)
    assert col.style == "column-parallel" and row.style == "row-parallel"
    assert col.local_range(112) == (28, 56)
    assert row.local_range(112) == (84, 112)
    assert col.local_shape((112, 64)) == (28, 64)
    assert row.local_shape((64, 112)) == (64, 28)
    assert col.divides((112, 64)) and not Shard(0, 0, 3).divides((112, 64))
    with pytest.raises(PlanError, match="degree 3 does not divide 112"):
        Shard(0, 0, 3).local_range(112)
    with pytest.raises(ValueError):
        Shard(2, 0, 2)
    with pytest.raises(ValueError):
        Shard(0, 2, 2)
    # the ranks' slices tile the dimension
    assert [Shard(0, i, 4).local_range(112) for i in range(4)] == [(0, 28), (28, 56), (56, 84), (84, 112)]
    assert valid_degrees([64, 32, 112]) == [1, 2, 4, 8, 16]


def test_tp_styles_follow_the_models_tp_plan():
    model = tiny("llama", num_hidden_layers=2)
    styles = tp_styles(model)
    assert set(styles) == set(linear_names(model))  # the LM head and embeddings stay whole
    assert styles[Q] == styles[K] == styles[GATE] == "colwise"
    assert styles[O] == styles[DOWN] == "rowwise"


def test_a_degree_that_divides_the_shapes_is_accepted():
    model = tiny("llama", num_hidden_layers=2)
    plan = SparsityPlan.from_thresholds(model, {n: 0.1 for n in linear_names(model)})
    for degree in (1, 2):
        check_degree(model, degree, plan)
    check_degree(model, 2)  # no plan: the shapes alone


def test_a_degree_that_does_not_divide_is_a_clear_error():
    model = tiny("llama", num_hidden_layers=2)
    with pytest.raises(PlanError, match=r"degree 3 does not divide the model's num_attention_heads \(4\)"):
        check_degree(model, 3)
    with pytest.raises(PlanError, match="degree 8 does not divide the model's num_attention_heads"):
        check_degree(model, 8)
    with pytest.raises(PlanError, match="integer >= 1"):
        check_degree(model, 0)
    # the shapes: the MLP width 113 splits over no degree but 1; the message names the layers
    odd = tiny("llama", num_hidden_layers=1, intermediate_size=113)
    with pytest.raises(PlanError, match=r"degree 2 does not divide .*gate_proj \(output features 113\).*"
                                        r"degrees that divide this model's shapes: 1$"):
        check_degree(odd, 2)
    shapes = {k: tuple(v) for k, v in linear_weights(model).items()}
    with pytest.raises(PlanError, match=r"degree 3 does not divide .*q_proj \(output features 64\).*"
                                        r"shapes: 1, 2, 4, 8, 16"):
        check_plan_for_degree(SparsityPlan(), 3, shapes, tp_styles(model))


def test_the_backends_check_names_the_uneven_sites_a_plan_masks():
    plan = SparsityPlan(thresholds={GATE: 0.1})
    uneven = ShardedSite(GATE, "mlp_in", (113, 64), Shard(0, 0, 2))
    with pytest.raises(PlanError, match="gate_proj .output features 113."):
        check_sharded_sites(plan, [uneven])
    # a site the plan does not mask (the LM head: role "other") may be uneven
    head = ShardedSite("lm_head", "other", (127, 64), Shard(0, 0, 2))
    check_sharded_sites(plan, [head, ShardedSite(GATE, "mlp_in", (112, 64), Shard(0, 0, 2))])
    check_sharded_sites(SparsityPlan(), [uneven])  # an empty plan masks nothing


def test_head_routing_is_refused_under_tensor_parallelism():
    model = tiny("llama", num_hidden_layers=2)
    plan = random_head_routing(model, density=0.5)
    check_degree(model, 1, plan)
    with pytest.raises(PlanError, match="head routing .* not supported under tensor parallelism"):
        check_degree(model, 2, plan)


def test_statistical_top_k_only_on_column_parallel_sites():
    model = tiny("llama", num_hidden_layers=2)
    with pytest.raises(PlanError, match="statistical top-k on row-parallel sites .*o_proj"):
        check_degree(model, 2, SparsityPlan.statistical(0.5, model))
    check_degree(model, 2, SparsityPlan.statistical(0.5, model, roles=("attn_in", "mlp_in")))
    # only the row-parallel role it names is refused (roles from the backend's site discovery)
    with pytest.raises(PlanError, match=r"row-parallel sites \(model.layers.0.mlp.down_proj, "
                                        r"model.layers.1.mlp.down_proj\) is not"):
        check_degree(model, 2, SparsityPlan.statistical(0.5, model, roles=("mlp_in", "mlp_down")))
    # where other rules cover the row-parallel sites, statistical top-k does not reach them
    downs_and_os = {n: 0.1 for n in linear_names(model) if n.endswith(("o_proj", "down_proj"))}
    plan = SparsityPlan(thresholds=downs_and_os, stat_topk=StatTopK(0.5))
    check_degree(model, 2, plan)
    # with the backend's own roles (one rank's sites)
    sites = [ShardedSite(O, "attn_out", (64, 64), Shard(1, 0, 2)), ShardedSite(Q, "attn_in", (64, 64), Shard(0, 0, 2))]
    with pytest.raises(PlanError, match="o_proj"):
        check_sharded_sites(SparsityPlan.statistical(0.5), sites)
    check_sharded_sites(SparsityPlan.statistical(0.5, roles=("attn_in", "mlp_in", "mlp_down")), sites)


def test_teal_cats_wina_and_predictor_plans_apply_at_any_dividing_degree():
    from tests.calibration.test_predictor import random_predictor_plan

    model = tiny("llama", num_hidden_layers=2)
    names = linear_names(model)
    plans = [
        SparsityPlan.from_thresholds(model, {n: 0.1 for n in names}),
        SparsityPlan.from_thresholds(model, {n: 0.1 for n in names}, score="wina"),
        SparsityPlan.from_thresholds(model, {}, activation_thresholds={n: 0.1 for n in names if "down" in n}),
        random_predictor_plan(model),
    ]
    for plan in plans:
        for degree in (1, 2):
            check_degree(model, degree, plan)
    assert isinstance(plans[0], actsparse.SparsityPlan)
