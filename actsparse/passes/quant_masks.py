"""Input masks on quantized linears (``actsparse.quantize``): the part of ``insert_masks`` that
replaces an ``actsparse::quant_linear`` by ``actsparse::quant_sparse_linear``.

Each quantized site gets its own call (the kernel reads one weight); where the traced rows cannot
pay for the sparse path, the masked input feeds the dense ``quant_linear`` instead. Rules that
need the float weight inside the graph (WINA cutoffs, CATS and predictor MLP rewrites) are
refused with a clear error rather than applied wrongly.
"""

from __future__ import annotations

import torch.fx as fx

from ..ops.dense import masked_input
from ..ops.quant_sparse_linear import quant_sparse_linear as quant_sparse_linear_op
from ..plan import PlanError
from .find_sites import Site
from .graph import run_dense, static_rows


def refuse_quantized(rule: str, sites: list[Site]) -> None:
    """Raise PlanError if a rule that reads float weights meets a quantized site."""
    quant = [s.module for s in sites if s.quant is not None]
    if quant:
        raise PlanError(f"{rule} rules are not supported on quantized linears (actsparse.quantize): "
                        f"{', '.join(quant[:3])}; use TEAL thresholds or statistical top-k there")


def emit_quant_masks(graph: fx.Graph, x: fx.Node, part: list, per_token: bool, hint: float, wina: bool,
                     orphans: list[fx.Node]) -> int:
    """Rewrite the quantized sites of ``part`` [(site, threshold, per_token)]; returns the number
    of sparse calls inserted."""
    if wina and not per_token:
        refuse_quantized("WINA", [m[0] for m in part])
    calls = 0
    for s, t, _ in part:
        q = s.quant
        if run_dense(x, s.in_features, [s.out_features], hint):
            with graph.inserting_before(s.node):
                xm = graph.call_function(masked_input, (x, t, per_token))
            s.node.replace_input_with(x, xm)
            s.rule = ("stat-topk z=" if per_token else "teal t=") + f"{t:.4g} int{q['bits']} (dense, {static_rows(x)} rows)"
            s.rewritten = True
            continue
        with graph.inserting_before(s.node):
            call = graph.call_function(quant_sparse_linear_op, (
                x, s.weight, q["scales"], q["offsets"], s.bias, float(t), per_token, q["bits"], q["group_size"],
                float(hint)))
        call.meta.update(s.node.meta)
        s.node.replace_all_uses_with(call)
        orphans.extend(s.node.all_input_nodes)
        graph.erase_node(s.node)
        s.rewritten = True
        s.rule = ("stat-topk z=" if per_token else "teal t=") + f"{t:.4g} int{q['bits']}"
        calls += 1
    return calls
