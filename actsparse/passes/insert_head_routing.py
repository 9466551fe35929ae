"""Head routing: rewrite each routed attention so that only the selected heads run.

For an attention whose output projection has a router in the plan (``plan.HeadRouting``):

    units = actsparse::route_heads(x, key, keep)       # per token, the units to run
    out   = actsparse::head_sparse_attention(q, k_cache, v_cache, mask, units, ...)

``x`` is the block input (q_proj's input), k/v the cache per KV head (HF's ``repeat_kv`` copies
become dead and are erased), the router weights graph constants. The op reads only the
selected units' K/V when decoding on the GPU and computes dense attention with the other heads
zeroed otherwise. Eager attention implementations keep their matmuls and get the zeroing after
them (the plan's semantics at dense speed). The output projection's input is then zero on whole
heads: the pass gives it an exact threshold-0 input mask (unless the plan has its own rule on
it), so ``insert_masks`` lowers it to the input-sparse kernel where the rows allow.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ops.dense import zero_unselected_heads
from ..ops.head_sparse_attention import head_sparse_attention as head_sparse_attention_op
from ..ops.route_heads import route_heads as route_heads_op
from ..plan import HeadRouting, PlanError
from .context import PassContext
from .find_attention import Attention, find_attention
from .graph import erase_orphans, example_value, replace_node


def _check(pname: str, spec: dict, att: Attention, ctx: PassContext) -> None:
    want = (spec["num_heads"], spec["head_dim"])
    if (att.num_heads, att.head_dim) != want:
        raise PlanError(f"head router for {pname!r} was made for {want[0]} heads of {want[1]}; the graph's "
                        f"attention has {att.num_heads} of {att.head_dim}")
    if att.kind == "sdpa" and att.num_kv_heads not in (spec["num_kv_heads"], spec["num_heads"]):
        raise PlanError(f"head router for {pname!r} was made for {spec['num_kv_heads']} KV heads; the graph's "
                        f"cache has {att.num_kv_heads}")
    if att.x_site.in_features != spec["in_features"]:
        raise PlanError(f"head router for {pname!r} takes {spec['in_features']} inputs; the block input has "
                        f"{att.x_site.in_features}")


def insert_head_routing(gm: fx.GraphModule, ctx: PassContext) -> None:
    rule = ctx.plan.rule(HeadRouting)
    if rule is None or rule.is_empty():
        return
    graph = gm.graph
    orphans: list[fx.Node] = []
    for att in find_attention(gm, ctx.sites):
        pname = ctx.names.get(att.o_site.module)
        spec = rule.specs.get(pname)
        if spec is None:
            continue
        ctx.stats.found_rules.add(pname)
        _check(pname, spec, att, ctx)
        w = example_value(att.x_site.weight)
        device = w.device if isinstance(w, torch.Tensor) else torch.device("cpu")
        dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
        key = ctx.constants.add(f"router:{pname}", *(rule.weights[f"{pname}.{p}"].detach().to(device, dtype).contiguous()
                                                      for p in ("w", "b")))
        keep, hpu, density = spec["keep"], spec["heads_per_unit"], rule.density(pname)
        x = att.x_site.input
        with graph.inserting_before(att.anchor):
            units = graph.call_function(route_heads_op, (x, key, keep))
            b = graph.call_method("size", (att.q, 0))
            t = graph.call_method("size", (att.q, 2))
            units = graph.call_method("reshape", (units, b, t, keep))
        if att.kind == "sdpa":
            with graph.inserting_before(att.anchor):
                new = graph.call_function(head_sparse_attention_op, (
                    att.q, att.k, att.v, att.mask, units, hpu, att.scale, att.is_causal, density))
            replace_node(graph, att.anchor, new, orphans)
        else:
            with graph.inserting_after(att.anchor):
                new = graph.call_function(zero_unselected_heads, (att.anchor, units, hpu))
            att.anchor.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        o = att.o_site
        if ctx.names.get(o.module) not in ctx.plan.thresholds:
            ctx.implied_thresholds[o.module] = (0.0, 1.0 - density)
        o.rule = f"heads {keep}/{spec['units']}" + ("" if att.kind == "sdpa" else " (eager attention: dense)")
        att.x_site.rule = att.x_site.rule if att.x_site.rule != "-" else f"routes {keep}/{spec['units']} units"
        ctx.stats.head_attention_calls += 1
    erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()
