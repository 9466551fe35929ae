"""Dense-to-MoE experts (plan rule ``experts``): run only the experts a router selects.

For each gated MLP ``down(act(gate(x)) * up(x))`` whose down projection has an experts rule,
the pass inserts

    mask = actsparse::route_experts(x, key, E, threshold)            # predicted expert norms > t
    out  = actsparse::expert_mlp(x, mask, w_gate, w_up, w_down, ...)  # the selected blocks only

The router's tensors become backend constants (fp32, on the weights' device) under ``key``,
so the one-line ``torch.compile(model, backend="sparse", options={"plan": plan})`` works. The
model must be the permuted one ``actsparse.moefy`` returned (or ``permute`` rebuilt): the plan
fingerprints shapes, not values. Runs before ``insert_exact``: an MLP takes one rule.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ops.expert_mlp import expert_mlp as expert_mlp_op
from ..ops.route_experts import route_experts as route_experts_op
from ..ops.sparse_linear import reserve_sparse_gemv
from ..plan import PlanError
from ..plan.rules.exact import ExactZeros
from ..plan.rules.experts import Experts
from .context import PassContext
from .find_sites import Site
from .graph import erase_orphans, example_value, mark_rewritten, replace_node
from .quant_masks import refuse_quantized


def _check(pname: str, spec: dict, s: Site, ctx: PassContext) -> None:
    if not s.gated:
        raise PlanError(f"experts for {pname!r}: its MLP is not gated (down(act(gate x) * up x)); "
                        "dense-to-MoE supports gated MLPs only")
    gate, up = s.gated["gate"], s.gated["up"]
    if s.rewritten or gate.rewritten or up.rewritten:
        raise PlanError(f"experts for {pname!r}: its MLP was already rewritten by another rule")
    if any(x.shard is not None for x in (gate, up, s)):
        raise PlanError(f"experts for {pname!r}: not supported under tensor parallelism (the router needs "
                        "every rank's experts); run the expert plan unsharded")
    prefix = pname[: len(pname) - len(s.module)]
    found = (ctx.names.get(gate.module, prefix + gate.module), ctx.names.get(up.module, prefix + up.module))
    if found != (spec["gate"], spec["up"]):
        raise PlanError(f"experts for {pname!r} were made for gate/up {spec['gate']}, {spec['up']}; "
                        f"the graph's MLP has {found[0]}, {found[1]}")
    if gate.plan_shape != (spec["neurons"], spec["in_features"]):
        raise PlanError(f"experts for {pname!r} were made for an MLP of {spec['in_features']} inputs and "
                        f"{spec['neurons']} neurons; the graph's gate is {gate.plan_shape[1]} -> {gate.plan_shape[0]}")
    if s.act != spec["act"]:
        raise PlanError(f"experts for {pname!r} were made for activation {spec['act']!r}; the graph's MLP "
                        f"uses {s.act!r}")
    others = [n for n in (pname, spec["gate"], spec["up"])
              if n in ctx.plan.thresholds or n in ctx.plan.activation_thresholds or n in ctx.plan.predictors]
    exact = ctx.plan.rule(ExactZeros)
    if exact is not None and pname in exact.modules():
        others.append(pname)
    if others:
        raise PlanError(f"plan has an experts rule and other rules on the same MLP ({sorted(set(others))}); "
                        "an MLP takes one")


def insert_experts(gm: fx.GraphModule, ctx: PassContext) -> None:
    rule = ctx.plan.rule(Experts)
    if rule is None or rule.is_empty():
        return
    graph = gm.graph
    orphans: list[fx.Node] = []
    for s in ctx.sites:
        pname = ctx.names.get(s.module)
        if s.role != "mlp_down" or pname not in rule.specs:
            continue
        spec = rule.specs[pname]
        ctx.stats.found_rules.add(pname)
        _check(pname, spec, s, ctx)
        gate, up = s.gated["gate"], s.gated["up"]
        refuse_quantized("experts", [gate, up, s])
        w = example_value(gate.weight)
        device = w.device if isinstance(w, torch.Tensor) else torch.device("cpu")
        key = ctx.constants.add(f"router:{pname}", *[t.detach().to(device=device, dtype=torch.float32).contiguous()
                                                     for t in rule.router(pname)])
        reserve_sparse_gemv(device, s.in_features, [s.out_features])
        hint = 1.0 - float(spec["density"])
        with graph.inserting_before(s.node):
            mask = graph.call_function(route_experts_op, (gate.input, key, int(spec["experts"]),
                                                          float(spec["threshold"])))
            new = graph.call_function(expert_mlp_op, (gate.input, mask, gate.weight, up.weight, s.weight,
                                                      gate.bias, up.bias, s.bias, s.act, hint))
        replace_node(graph, s.node, new, orphans)
        mark_rewritten((gate, up, s), f"experts E={spec['experts']} density {spec['density']:.2f}")
        ctx.stats.expert_mlp_calls += 1
        ctx.stats.masked_sites += 1
    erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()
