"""Learned predictors: rewrite the gated MLPs a plan gives predictors into predicted-sparse ops.

For each gated MLP ``down(act(gate(x)) * up(x))`` whose down projection has a predictor, the
pass inserts

    mask = actsparse::predict_mask(x, key, n, keep, threshold, topk)     # the predictor
    out  = actsparse::predicted_mlp(x, mask, w_gate, w_up, w_down, ...)  # only predicted rows

The predictor's weights, cast to the MLP weights' device and dtype, become graph constants
(``ctx.constants``) under ``key``, so Dynamo's graph needs nothing from the model: the one-line
``torch.compile(model, backend="sparse", options={"plan": plan})`` works as is.

Under tensor parallelism (gate/up column-parallel, down row-parallel) every rank runs the whole
predictor (it is low-rank: cheap) and keeps its slice of the neurons of the mask, so a top-k
selection is the global top-k, exactly as unsharded.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops.predict_mask import predict_mask as predict_mask_op
from ..ops.predicted_mlp import predicted_mlp as predicted_mlp_op
from ..ops.sparse_linear import reserve_sparse_gemv
from ..plan import PlanError
from .context import PassContext
from .find_sites import Site
from .graph import erase_orphans, example_value, mark_rewritten, replace_node
from .quant_masks import refuse_quantized


def _check(pname: str, spec: dict, s: Site, ctx: PassContext) -> None:
    if not s.gated:
        raise PlanError(f"predictor for {pname!r}: its MLP is not gated (down(act(gate x) * up x)); "
                        "predictors support gated MLPs only")
    gate, up = s.gated["gate"], s.gated["up"]
    if s.rewritten or gate.rewritten or up.rewritten:
        raise PlanError(f"predictor for {pname!r}: its MLP was already rewritten by another rule")
    prefix = pname[: len(pname) - len(s.module)]  # the graph's names may be relative to a submodule
    found = (ctx.names.get(gate.module, prefix + gate.module), ctx.names.get(up.module, prefix + up.module))
    if found != (spec["gate"], spec["up"]):
        raise PlanError(f"predictor for {pname!r} was made for gate/up {spec['gate']}, {spec['up']}; "
                        f"the graph's MLP has {found[0]}, {found[1]}")
    if gate.plan_shape != (spec["neurons"], spec["in_features"]):
        raise PlanError(f"predictor for {pname!r} was made for an MLP of {spec['in_features']} inputs and "
                        f"{spec['neurons']} neurons; the graph's gate is {gate.plan_shape[1]} -> {gate.plan_shape[0]}")
    layouts = [(x.shard.dim, x.shard.index, x.shard.degree) if x.shard else None for x in (gate, up, s)]
    if any(layouts) and not (layouts[0] == layouts[1] and layouts[0] and layouts[0][0] == 0
                             and layouts[2] == (1,) + layouts[0][1:]):
        raise PlanError(f"predictor for {pname!r}: under tensor parallelism its MLP must be sharded as "
                        "gate/up column-parallel and down row-parallel over the same ranks, so that each rank "
                        "holds the same slice of the neurons")


def _local_neurons(graph: fx.Graph, mask: fx.Node, gate: Site, neurons: int) -> fx.Node:
    """Under tensor parallelism: the rank's slice of the predicted mask (the predictor runs in full
    on every rank, so a top-k is the global one)."""
    if gate.shard is None:
        return mask
    lo, hi = gate.shard.local_range(neurons)
    return graph.call_function(operator.getitem, (mask, (Ellipsis, slice(lo, hi))))


def insert_predictors(gm: fx.GraphModule, ctx: PassContext) -> None:
    preds = ctx.plan.predictors
    if not preds:
        return
    graph = gm.graph
    tensors = ctx.plan.predictor_tensors
    orphans: list[fx.Node] = []
    for s in ctx.sites:
        pname = ctx.names.get(s.module)
        if s.role != "mlp_down" or pname not in preds:
            continue
        spec = preds[pname]
        ctx.stats.found_rules.add(pname)
        _check(pname, spec, s, ctx)
        refuse_quantized("predictor", [s.gated["gate"], s.gated["up"], s])
        gate, up = s.gated["gate"], s.gated["up"]
        w = example_value(gate.weight)
        device = w.device if isinstance(w, torch.Tensor) else torch.device("cpu")
        dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
        cast = [tensors[f"{pname}.{p}"].detach().to(device=device, dtype=dtype).contiguous()
                for p in ("w1", "w2", "b2")]
        key = ctx.constants.add(f"predictor:{pname}", *cast)
        reserve_sparse_gemv(device, s.in_features, [s.out_features])
        topk = spec["selection"] == "topk"
        hint = ctx.hint(pname)
        with graph.inserting_before(s.node):
            mask = graph.call_function(predict_mask_op, (gate.input, key, int(spec["neurons"]), int(spec["keep"]),
                                                         float(spec["threshold"]), topk))
            mask = _local_neurons(graph, mask, gate, int(spec["neurons"]))
            new = graph.call_function(predicted_mlp_op, (
                gate.input, mask, gate.weight, up.weight, s.weight, gate.bias, up.bias, s.bias, s.act, hint))
        replace_node(graph, s.node, new, orphans)
        sel = f"top-{spec['keep']}" if topk else f"logit>{spec['threshold']:.3g}"
        mark_rewritten((gate, up, s), f"predictor r={spec['rank']} {sel}/{spec['neurons']}")
        ctx.stats.predicted_mlp_calls += 1
        ctx.stats.masked_sites += 1
    erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()
