"""Check the plan against the graph's weights: a plan made for another model fails here,
naming the weights that differ (before anything is rewritten).

Under tensor parallelism the graph's weights are local shards: the plan is checked against the
parameters' global shapes, and the sharding against what the plan's rules can be sliced to
(``actsparse.plan.sharding``: the degree divides the shapes; no rule kind that needs all ranks).
"""

from __future__ import annotations

import torch.fx as fx

from ..plan.sharding import ShardedSite, check_sharded_sites
from .context import PassContext
from .resolve_names import resolve_names


def check_plan(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.names = resolve_names(ctx.sites, ctx.plan)
    ctx.stats.unresolved = [s.module for s in ctx.sites if s.module not in ctx.names]
    shapes = {}
    for s in ctx.sites:
        if s.module in ctx.names:
            shapes[ctx.names[s.module]] = s.plan_shape
    ctx.plan.check_weight_shapes(shapes)
    check_sharded_sites(ctx.plan, [ShardedSite(ctx.names[s.module], s.role, s.plan_shape, s.shard)
                                   for s in ctx.sites if s.shard is not None and s.module in ctx.names])
