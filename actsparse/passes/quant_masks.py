"""Input masks on quantized linears: the part of ``insert_masks`` that replaces an
``actsparse::quant_linear`` (``actsparse.quantize``) by ``actsparse::quant_sparse_linear``, and a
linear over a torchao weight by ``actsparse::held_quant_sparse_linear`` (the weight converted
once to our input-major storage, cached on the parameter, held as a backend constant).

The kernel reads one weight per call. torchao sites on one input with one threshold and no bias
(q/k/v, gate/up) are joined: their converted weights side by side along the outputs, one call,
its output split, so a layer makes fewer launches. Every other quantized site gets its own call;
where the traced rows cannot pay for the sparse path, the masked input feeds the dense
``quant_linear`` instead. Rules that need the float weight inside the graph (WINA cutoffs, CATS
and predictor MLP rewrites) are refused with a clear error rather than applied wrongly.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops.dense import masked_input
from ..ops.held_quant_sparse_linear import held_quant_sparse_linear_op
from ..ops.quant_sparse_linear import quant_sparse_linear as quant_sparse_linear_op
from ..plan import PlanError
from ..quant.torchao_weights import input_major, input_major_joined
from .find_sites import Site
from .graph import run_dense, static_rows, weight_value


def refuse_quantized(rule: str, sites: list[Site]) -> None:
    """Raise PlanError if a rule that reads float weights meets a quantized site."""
    quant = [s.module for s in sites if s.quant is not None]
    if quant:
        raise PlanError(f"{rule} rules are not supported on quantized linears (actsparse.quantize, torchao): "
                        f"{', '.join(quant[:3])}; use TEAL thresholds or statistical top-k there")


def hold(ctx, name: str, qw) -> str:
    """Register a converted weight's storage as backend constants; the key the held op reads."""
    return ctx.constants.add(f"torchao:{name}", qw.qweight, qw.scales, *(() if qw.offsets is None else (qw.offsets,)))


def held_call(gm: fx.GraphModule, ctx, x: fx.Node, s: Site, t: float, per_token: bool, hint: float):
    """The torchao site's weight as our storage (converted once per parameter), held as a constant."""
    qw = input_major(weight_value(gm, s.weight))
    key = hold(ctx, s.module, qw)
    s.quant.update(bits=qw.bits, group_size=qw.group_size)
    return gm.graph.call_function(held_quant_sparse_linear_op, (
        x, key, s.bias, float(t), per_token, qw.bits, qw.group_size, s.out_features, float(hint)))


def joinable(x: fx.Node, part: list, hint: float) -> list[list]:
    """Groups of two or more torchao sites of ``part`` that one call can serve: no bias, one
    threshold, and rows for which the sparse path pays at their joined width."""
    by_t: dict[float, list] = {}
    for m in part:
        if m[0].quant.get("torchao") and m[0].bias is None:
            by_t.setdefault(float(m[1]), []).append(m)
    return [g for g in by_t.values()
            if len(g) > 1 and not run_dense(x, g[0][0].in_features, [m[0].out_features for m in g], hint)]


def emit_joined(gm: fx.GraphModule, ctx, x: fx.Node, group: list, per_token: bool, hint: float,
                orphans: list[fx.Node]) -> bool:
    """One held call for the torchao sites of ``group``, its output split back to each site;
    False (nothing changed) if their weights do not share one format."""
    sites = [m[0] for m in group]
    try:
        qw = input_major_joined([weight_value(gm, s.weight) for s in sites])
    except ValueError:
        return False
    graph = gm.graph
    first = next(n for n in graph.nodes if any(n is s.node for s in sites))
    key = hold(ctx, "+".join(s.module for s in sites), qw)
    t = float(group[0][1])
    with graph.inserting_before(first):
        call = graph.call_function(held_quant_sparse_linear_op, (
            x, key, None, t, per_token, qw.bits, qw.group_size, qw.out_features, float(hint)))
        parts = graph.call_function(torch.split, (call, [s.out_features for s in sites], -1))
    label = ("stat-topk z=" if per_token else "teal t=") + f"{t:.4g} torchao "
    prev = parts
    for i, s in enumerate(sites):
        with graph.inserting_after(prev):
            item = prev = graph.call_function(operator.getitem, (parts, i))
        item.meta.update(s.node.meta)
        s.node.replace_all_uses_with(item)
        orphans.extend(s.node.all_input_nodes)
        graph.erase_node(s.node)
        s.quant.update(bits=qw.bits, group_size=qw.group_size)
        s.rewritten = True
        s.rule = label + _format(s.quant) + f" (shared x{len(sites)})"
    return True


def emit_quant_masks(gm: fx.GraphModule, ctx, x: fx.Node, part: list, per_token: bool, hint: float, wina: bool,
                     orphans: list[fx.Node]) -> int:
    """Rewrite the quantized sites of ``part`` [(site, threshold, per_token)]; returns the number
    of sparse calls inserted."""
    if wina and not per_token:
        refuse_quantized("WINA", [m[0] for m in part])
    graph = gm.graph
    calls = 0
    for group in joinable(x, part, hint):
        if emit_joined(gm, ctx, x, group, per_token, hint, orphans):
            calls += 1
            part = [m for m in part if not any(m is g for g in group)]
    for s, t, _ in part:
        q = s.quant
        kind = "torchao " if q.get("torchao") else ""
        label = ("stat-topk z=" if per_token else "teal t=") + f"{t:.4g} {kind}"
        if run_dense(x, s.in_features, [s.out_features], hint):
            with graph.inserting_before(s.node):
                xm = graph.call_function(masked_input, (x, t, per_token))
            s.node.replace_input_with(x, xm)
            s.rule = label + f"{_format(q)} (dense, {static_rows(x)} rows)"
            s.rewritten = True
            continue
        with graph.inserting_before(s.node):
            if q.get("torchao"):
                call = held_call(gm, ctx, x, s, t, per_token, hint)
            else:
                call = graph.call_function(quant_sparse_linear_op, (
                    x, s.weight, q["scales"], q["offsets"], s.bias, float(t), per_token, q["bits"], q["group_size"],
                    float(hint)))
        call.meta.update(s.node.meta)
        s.node.replace_all_uses_with(call)
        orphans.extend(s.node.all_input_nodes)
        graph.erase_node(s.node)
        s.rewritten = True
        s.rule = label + _format(q)
        calls += 1
    return calls


def _format(q: dict) -> str:
    """int8 / int8 g32 / int4 g64 (torchao's before its weight is read: "quantized")."""
    if "bits" not in q:
        return "quantized"
    return f"int{q['bits']}" + (f" g{q['group_size']}" if q["group_size"] else "")
