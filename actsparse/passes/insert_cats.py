"""CATS: rewrite ``down(act(gate x) * up x)`` into one ``actsparse::gated_mlp`` call.

Only for gated MLPs whose down projection has an activation threshold; on a plain MLP the
activation is the down input, so ``insert_masks`` treats the rule as that input's threshold.
Where the traced rows cannot pay for the sparse path, the masked dense form is emitted instead.
"""

from __future__ import annotations

import torch.fx as fx

from ..ops.dense import masked_gated_mlp
from ..ops.gated_mlp import gated_mlp as gated_mlp_op
from ..plan import PlanError
from .context import PassContext
from .find_sites import Site
from .graph import erase_orphans, mark_rewritten, replace_node, run_dense, static_rows
from .quant_masks import refuse_quantized


def insert_cats(gm: fx.GraphModule, ctx: PassContext) -> None:
    acts = ctx.plan.activation_thresholds
    if not acts:
        return
    graph = gm.graph
    orphans: list[fx.Node] = []
    for s in ctx.sites:
        pname = ctx.names.get(s.module)
        if s.role != "mlp_down" or pname not in acts:
            continue
        ctx.stats.found_rules.add(pname)
        if not s.gated:
            continue  # plain MLP: the down input's threshold (insert_masks)
        t = acts[pname]
        gate, up = s.gated["gate"], s.gated["up"]
        refuse_quantized("CATS", [gate, up, s])
        clash = [ctx.names.get(x.module) for x in (gate, up, s) if ctx.names.get(x.module) in ctx.plan.thresholds]
        if clash:
            raise PlanError(f"plan has both a CATS rule on {pname} and input thresholds on {clash}; "
                            "an MLP takes one or the other")
        lower_gated_mlp(graph, s, t, ctx.hint(pname), orphans, f"cats t={t:.4g}")
        ctx.stats.gated_mlp_calls += 1
        ctx.stats.masked_sites += 1
    erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()


def lower_gated_mlp(graph: fx.Graph, s: Site, threshold: float, hint: float, orphans: list[fx.Node],
                    rule: str) -> None:
    """Replace the gated MLP ending at site ``s`` by one gated op at ``threshold`` (the masked
    dense form where the traced rows cannot pay for the sparse path); ``rule`` names it in the
    site table."""
    gate, up = s.gated["gate"], s.gated["up"]
    dense = run_dense(gate.input, gate.in_features, [gate.out_features], hint, gated=True)
    with graph.inserting_before(s.node):
        args = (gate.input, gate.weight, up.weight, s.weight, gate.bias, up.bias, s.bias, s.act, threshold)
        new = graph.call_function(masked_gated_mlp, args) if dense else \
            graph.call_function(gated_mlp_op, args + (False, hint))
    replace_node(graph, s.node, new, orphans)
    note = f" (dense, {static_rows(gate.input)} rows)" if dense else ""
    mark_rewritten((gate, s, up), f"{rule}{note}")
