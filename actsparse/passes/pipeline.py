"""The ordered pass pipeline the backend runs on each Dynamo graph.

Each pass is ``def pass_(gm, ctx) -> None`` with one job, in its own module; ``PASSES`` is the
order: bring tensor-parallel (DTensor) linears to their local form, find the sites, check the
plan against the graph's weights, lower built-in top-k MLPs (Gemma 3n), route attention heads,
let the remaining SDPA calls read the KV cache per KV head (no ``repeat_kv`` copies), lower
dense-to-MoE MLPs to their experts, turn exact (ReLU-family) rules into zero-threshold
masks, rewrite CATS MLPs, add R-Sparse's low-rank term beside its mask, rewrite input masks into
actsparse ops, fold a gated MLP's product into its gate/up call, rewrite learned predictors, send
the CPU's unmasked quantized linears to the native kernel, note which weights want input-major
storage, and render the debug table.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ops  # noqa: F401  (registers the actsparse ops)
from ..plan import SparsityPlan
from .builtin_topk import lower_builtin_topk
from .check_plan import check_plan
from .context import PassContext
from .find_sites import discover_sites, site_table
from .fuse_gated_product import fuse_gated_product
from .gqa_attention import gqa_attention
from .insert_cats import insert_cats
from .insert_exact import insert_exact
from .insert_experts import insert_experts
from .insert_head_routing import insert_head_routing
from .insert_masks import insert_masks
from .insert_predictors import insert_predictors
from .insert_rsparse import insert_rsparse
from .localize_dtensor import localize_dtensor
from .mark_layouts import mark_layouts
from .quant_dense_cpu import lower_dense_quant_cpu


def find_sites(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.sites = discover_sites(gm)


def render_table(gm: fx.GraphModule, ctx: PassContext) -> None:
    ctx.table = site_table(ctx.sites)


PASSES = (localize_dtensor, find_sites, check_plan, lower_builtin_topk, insert_head_routing, gqa_attention,
          insert_experts, insert_exact,
          insert_cats, insert_rsparse, insert_masks, fuse_gated_product,
          insert_predictors, lower_dense_quant_cpu, mark_layouts, render_table)


def run_passes(gm: fx.GraphModule, plan: SparsityPlan, gqa_attention: bool = True,
               fuse_gated_product: bool | str = "auto") -> PassContext:
    ctx = PassContext(plan=plan, gqa_attention=gqa_attention, fuse_gated_product=fuse_gated_product)
    for p in PASSES:
        p(gm, ctx)
    return ctx
