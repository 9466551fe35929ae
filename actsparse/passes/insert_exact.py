"""Exact-zero MLPs (plan rule ``exact``): skip the neurons the activation itself zeroes.

A gated MLP ``down(act(gate x) * up x)`` becomes one ``actsparse::gated_mlp`` call with
threshold 0 (mask ``|act(gate x)| > 0``: for ReLU exactly the neurons that contribute); any
other MLP (plain, or dReLU's ``relu(gate) * relu(up)``, which the gated pattern does not
match), and a gated MLP whose gate or up projection has input thresholds of its own (ReLU on
the MLP input: exact zeros there too), gets an exact-zero input mask on its down projection,
lowered by ``insert_masks``.
Either way the compiled model computes the eager one. Runs before ``insert_cats``.
"""

from __future__ import annotations

import torch.fx as fx

from ..plan import PlanError
from ..plan.rules.exact import ExactZeros
from .context import PassContext
from .find_sites import Site
from .graph import erase_orphans
from .insert_cats import lower_gated_mlp

#: Sparsity assumed where the plan measured none: relufied MLPs are about 90% zero. Only the
#: GPU cost model reads it (the CPU path decides by rows).
UNMEASURED_HINT = 0.9


def _hint(ctx: PassContext, pname: str) -> float:
    v = ctx.plan.measured.get(pname, ctx.plan.target)
    return UNMEASURED_HINT if v is None else float(v)


def _check_clash(ctx: PassContext, pname: str) -> None:
    if pname in ctx.plan.activation_thresholds:
        raise PlanError(f"plan has both an exact rule and a CATS threshold on {pname}; an MLP takes one")


def _inputs_masked(ctx: PassContext, s: Site) -> bool:
    """Whether the plan puts input thresholds on the gate or up projection (relu-gate models:
    their input is exactly sparse too): then those stay linears of their own."""
    return any(ctx.names.get(x.module) in ctx.plan.thresholds for x in s.gated.values())


def insert_exact(gm: fx.GraphModule, ctx: PassContext) -> None:
    rule = ctx.plan.rule(ExactZeros)
    if rule is None or rule.is_empty():
        return
    names = rule.modules()
    graph = gm.graph
    orphans: list[fx.Node] = []
    for s in ctx.sites:
        pname = ctx.names.get(s.module)
        if pname not in names:
            continue
        if s.role != "mlp_down":
            raise PlanError(f"exact rule on {pname}, which is no MLP down projection in the traced graph "
                            f"(its role is {s.role})")
        ctx.stats.found_rules.add(pname)
        _check_clash(ctx, pname)
        if s.gated and not _inputs_masked(ctx, s):
            lower_gated_mlp(graph, s, 0.0, _hint(ctx, pname), orphans, f"exact ({s.act})")
            ctx.stats.gated_mlp_calls += 1
            ctx.stats.masked_sites += 1
        else:  # the down input itself holds the zeros: insert_masks lowers a threshold-0 mask
            ctx.implied_thresholds[s.module] = (0.0, _hint(ctx, pname))
    erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()
