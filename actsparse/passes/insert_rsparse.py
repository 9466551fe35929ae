"""Sparse plus low-rank linears (plan rule ``rsparse``): add the low-rank part, mask the rest.

For each linear of the rule the pass adds, after the linear,

    y = linear(x, W, b) + actsparse::lowrank_complement(x, key, out, t)   # A (B (x * (|x| <= t)))

and records the threshold ``t`` as the linear's input mask (``ctx.implied_thresholds``), so
``insert_masks`` (which runs next) lowers ``linear`` to ``sparse_linear`` on ``|x| > t``,
sharing one call with the other linears of the same input as usual. The factors, cast to
the weight's device and dtype, become graph constants. Rank 0 adds nothing: a TEAL threshold.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops.lowrank_complement import lowrank_complement as lowrank_complement_op
from ..plan import PlanError
from ..plan.rules.rsparse import LowRankSparse
from .context import PassContext
from .graph import example_value


def insert_rsparse(gm: fx.GraphModule, ctx: PassContext) -> None:
    rule = ctx.plan.rule(LowRankSparse)
    if rule is None or rule.is_empty():
        return
    graph = gm.graph
    others = set().union(*(r.modules() for r in ctx.plan.rules.values() if r is not rule))
    for s in ctx.sites:
        pname = ctx.names.get(s.module)
        if pname not in rule.specs:
            continue
        if pname in others:
            raise PlanError(f"plan has an rsparse rule and another rule on {pname}; a linear takes one")
        if s.rewritten or s.shard is not None:
            raise PlanError(f"rsparse rule on {pname}: the linear is "
                            + ("already rewritten by another rule" if s.rewritten else "tensor-parallel (unsupported)"))
        ctx.stats.found_rules.add(pname)
        spec = rule.specs[pname]
        ctx.implied_thresholds[s.module] = (spec["threshold"], spec["sparsity"])
        pair = rule.pair(pname)
        if pair is None:
            continue
        w = example_value(s.weight)
        device = w.device if isinstance(w, torch.Tensor) else torch.device("cpu")
        dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
        a, b = (t.detach().to(device=device, dtype=dtype).contiguous() for t in pair)
        key = ctx.constants.add(f"rsparse:{pname}", a, b)
        with graph.inserting_after(s.node):
            low = graph.call_function(lowrank_complement_op, (s.input, key, int(spec["out_features"]),
                                                               float(spec["threshold"])))
        with graph.inserting_after(low):
            total = graph.call_function(operator.add, (s.node, low))
        for n in (low, total):
            n.meta.update({k: v for k, v in s.node.meta.items() if k in ("example_value", "val", "nn_module_stack",
                                                                          "stack_trace", "source_fn_stack")})
        s.node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    graph.lint()
    gm.recompile()
