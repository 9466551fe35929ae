"""Input masks on quantized linears: the part of ``insert_masks`` that replaces an
``actsparse::quant_linear`` (``actsparse.quantize``) by ``actsparse::quant_sparse_linear``, and a
linear over a torchao weight by ``actsparse::held_quant_sparse_linear`` (the weight converted
once to our input-major storage, cached on the parameter, held as a backend constant).

Each quantized site gets its own call (the kernel reads one weight); where the traced rows cannot
pay for the sparse path, the masked input feeds the dense ``quant_linear`` instead. Rules that
need the float weight inside the graph (WINA cutoffs, CATS and predictor MLP rewrites) are
refused with a clear error rather than applied wrongly.
"""

from __future__ import annotations

import torch.fx as fx

from ..ops.dense import masked_input
from ..ops.held_quant_sparse_linear import held_quant_sparse_linear_op
from ..ops.quant_sparse_linear import quant_sparse_linear as quant_sparse_linear_op
from ..plan import PlanError
from ..quant.torchao_weights import input_major
from .find_sites import Site
from .graph import run_dense, static_rows, weight_value


def refuse_quantized(rule: str, sites: list[Site]) -> None:
    """Raise PlanError if a rule that reads float weights meets a quantized site."""
    quant = [s.module for s in sites if s.quant is not None]
    if quant:
        raise PlanError(f"{rule} rules are not supported on quantized linears (actsparse.quantize, torchao): "
                        f"{', '.join(quant[:3])}; use TEAL thresholds or statistical top-k there")


def held_call(gm: fx.GraphModule, ctx, x: fx.Node, s: Site, t: float, per_token: bool, hint: float):
    """The torchao site's weight as our storage (converted once per parameter), held as a constant."""
    qw = input_major(weight_value(gm, s.weight))
    held = (qw.qweight, qw.scales) + (() if qw.offsets is None else (qw.offsets,))
    key = ctx.constants.add(f"torchao:{s.module}", *held)
    s.quant.update(bits=qw.bits, group_size=qw.group_size)
    return gm.graph.call_function(held_quant_sparse_linear_op, (
        x, key, s.bias, float(t), per_token, qw.bits, qw.group_size, s.out_features, float(hint)))


def emit_quant_masks(gm: fx.GraphModule, ctx, x: fx.Node, part: list, per_token: bool, hint: float, wina: bool,
                     orphans: list[fx.Node]) -> int:
    """Rewrite the quantized sites of ``part`` [(site, threshold, per_token)]; returns the number
    of sparse calls inserted."""
    if wina and not per_token:
        refuse_quantized("WINA", [m[0] for m in part])
    graph = gm.graph
    calls = 0
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
