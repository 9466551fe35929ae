"""The ordered pass pipeline the backend runs on each Dynamo graph.

Each pass is ``def pass_(gm, ctx) -> None`` with one job; ``PASSES`` is the order:
discover sites, check the plan against the graph's weights, insert masks, insert learned
predictors and their predicted-sparse MLPs, note which weights want input-major storage, and
render the debug table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import kernels  # noqa: F401  (registers the actsparse ops)
from ..plan import SparsityPlan
from .insert_masks import RewriteStats, insert_masks, resolve_names
from .insert_predictors import PredictorStats, insert_predictors
from .sites import Site, discover_sites, site_table


@dataclass
class PassContext:
    plan: SparsityPlan
    sites: list[Site] = field(default_factory=list)
    stats: RewriteStats = field(default_factory=RewriteStats)
    input_major_inputs: list[int] = field(default_factory=list)
    table: str = ""
    predictor_stats: PredictorStats = field(default_factory=PredictorStats)


def find_sites(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.sites = discover_sites(gm)


def check_plan(gm: fx.GraphModule, ctx: PassContext) -> None:
    """A plan made for another model fails here, naming the weights that differ."""
    names = resolve_names(ctx.sites, ctx.plan)
    shapes = {}
    for s in ctx.sites:
        if s.module in names:
            shapes[names[s.module]] = (s.out_features, s.in_features) if s.kind == "linear" \
                else (s.in_features, s.out_features)
    ctx.plan.check_weight_shapes(shapes)


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    if not ctx.plan.is_empty:
        ctx.stats = insert_masks(gm, ctx.sites, ctx.plan)


def add_predictors(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Learned predictors: predictor plus predicted-sparse MLP in place of the gated MLP."""
    if ctx.plan.predictors:
        ctx.predictor_stats = insert_predictors(gm, ctx.sites, ctx.plan)
        ctx.stats.found_rules |= ctx.predictor_stats.found_rules
        ctx.stats.masked_sites += ctx.predictor_stats.predicted_mlp_calls


def mark_input_major(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Placeholder positions of nn.Linear weights that the inserted ops read input-sparse."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pos = {n: i for i, n in enumerate(placeholders)}
    wanted = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.actsparse.sparse_linear.default,
                           torch.ops.actsparse.channel_sparse_linear.default):
            wanted.update(w for w in node.args[1] if w.op == "placeholder")
        elif node.target is torch.ops.actsparse.gated_mlp.default:
            wanted.add(node.args[3])  # down: input-sparse; up stays row-major (output-sparse)
        elif node.target is torch.ops.actsparse.predicted_mlp.default:
            wanted.add(node.args[4])  # down: input-sparse; gate and up stay row-major
    ctx.input_major_inputs = sorted(pos[w] for w in wanted if w in pos)


def render_table(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.table = site_table(ctx.sites)


PASSES = (find_sites, check_plan, rewrite, add_predictors, mark_input_major, render_table)


def run_passes(gm: fx.GraphModule, plan: SparsityPlan) -> PassContext:
    ctx = PassContext(plan=plan)
    for p in PASSES:
        p(gm, ctx)
    return ctx
