"""Check the plan against the graph's weights: a plan made for another model fails here,
naming the weights that differ (before anything is rewritten)."""

from __future__ import annotations

import torch.fx as fx

from .context import PassContext
from .resolve_names import resolve_names


def check_plan(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.names = resolve_names(ctx.sites, ctx.plan)
    ctx.stats.unresolved = [s.module for s in ctx.sites if s.module not in ctx.names]
    shapes = {}
    for s in ctx.sites:
        if s.module in ctx.names:
            shapes[ctx.names[s.module]] = (s.out_features, s.in_features) if s.kind == "linear" \
                else (s.in_features, s.out_features)
    ctx.plan.check_weight_shapes(shapes)
