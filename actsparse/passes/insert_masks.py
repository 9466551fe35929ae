"""Input masks: rewrite linears with TEAL thresholds or statistical top-k into actsparse ops.

Linears that share an input (q/k/v, gate/up) and have rules become one
``actsparse::sparse_linear`` call, one output per linear, each with its own threshold; fixed and
per-token (statistical) thresholds never share a call. With a WINA plan (``score == "wina"``) a
threshold t applies to ``|x_i| * ||W[:, i]||``: the pass computes the per-channel cutoffs
``t / ||W[:, i]||`` from the weights being compiled, registers them as graph constants and calls
``actsparse::channel_sparse_linear``. Where the traced rows cannot pay for the sparse path, the
masked dense form is emitted instead (Inductor fuses the mask into the input's producer).
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch.fx as fx

from ..ops.channel_sparse_linear import channel_sparse_linear as channel_sparse_linear_op
from ..ops.dense import masked_input
from ..ops.reference import wina_cutoffs, wina_cutoffs_from_norms
from ..ops.sparse_linear import sparse_linear as sparse_linear_op
from .context import PassContext
from .dtensor import column_norms
from .find_sites import Site
from .graph import erase_orphans, node_order, run_dense, static_rows, weight_value
from .quant_masks import emit_quant_masks


def _weight_arg(graph: fx.Graph, site: Site) -> fx.Node:
    """The weight in nn.Linear layout [out, in]: Conv1D's [in, out] weight gets a ``t()`` view."""
    if site.kind == "linear":
        return site.weight
    with graph.inserting_before(site.node):
        return graph.call_method("t", (site.weight,))


def _rules(ctx: PassContext) -> dict[fx.Node, list[tuple[Site, float, bool]]]:
    """Masked sites grouped by shared input: (site, threshold, per_token)."""
    plan, st = ctx.plan, ctx.plan.stat_topk
    thresholds, acts = plan.thresholds, plan.activation_thresholds
    groups: dict[fx.Node, list[tuple[Site, float, bool]]] = defaultdict(list)
    for s in ctx.sites:
        if s.rewritten:
            continue
        pname = ctx.names.get(s.module)
        if pname in thresholds:
            groups[s.input].append((s, thresholds[pname], False))
            ctx.stats.found_rules.add(pname)
        elif s.role == "mlp_down" and pname in acts and not s.gated:
            groups[s.input].append((s, acts[pname], False))  # plain MLP: CATS is the down input's mask
        elif s.module in ctx.implied_thresholds:  # exact zeros another pass made (head routing)
            groups[s.input].append((s, ctx.implied_thresholds[s.module][0], False))
        elif st is not None and s.role in st.roles and st.sparsity > 0:
            groups[s.input].append((s, st.multiplier, True))
    return groups


def _calls(members: list[tuple[Site, float, bool]]):
    """The calls the masked sites of one input become: (per_token, members of the call).

    Fixed and per-token thresholds never share a call; nor do sites with and without a bias
    (torch.library takes a bias list that mixes None and tensors as one opaque value, so in
    grad mode its biases could get no gradient: the op refuses it).
    """
    for per_token in (False, True):
        for has_bias in (False, True):
            part = [m for m in members if m[2] == per_token and (m[0].bias is not None) == has_bias]
            if part:
                yield per_token, part


def insert_masks(gm: fx.GraphModule, ctx: PassContext) -> None:
    groups = _rules(ctx)
    if not groups:
        return
    graph = gm.graph
    order = node_order(graph)
    wina = ctx.plan.score == "wina"
    orphans: list[fx.Node] = []
    replaced: dict[fx.Node, fx.Node] = {}  # a rewritten linear feeding another (LAuReL's left -> right)
    for x, members in groups.items():
        x = replaced.get(x, x)
        for per_token, part in _calls(members):
            channel = wina and not per_token
            hint = max(ctx.implied_thresholds[m[0].module][1] if m[0].module in ctx.implied_thresholds
                       else ctx.hint(ctx.names.get(m[0].module, m[0].module)) for m in part)
            quant = [m for m in part if m[0].quant is not None]  # actsparse.quantize / torchao linears
            if quant:
                ctx.stats.sparse_linear_calls += emit_quant_masks(gm, ctx, x, quant, per_token, hint, wina, orphans)
                ctx.stats.masked_sites += len(quant)
                part = [m for m in part if m[0].quant is None]
                if not part:
                    continue
            first = min((m[0].node for m in part), key=order)
            ns = [m[0].out_features for m in part]
            if not channel and run_dense(x, part[0][0].in_features, ns, hint):
                _emit_dense(graph, x, part, per_token, first, orphans)
                ctx.stats.masked_sites += len(part)
                continue
            with graph.inserting_before(first):
                weights = [_weight_arg(graph, m[0]) for m in part]
                if channel:
                    key = ctx.constants.add(f"wina:{part[0][0].module}", *(_cutoffs(gm, m[0], m[1]) for m in part))
                    call = graph.call_function(channel_sparse_linear_op, (
                        x, weights, [m[0].bias for m in part], key, hint))
                else:
                    call = graph.call_function(sparse_linear_op, (
                        x, weights, [m[0].bias for m in part], [m[1] for m in part], per_token, hint))
            for i, (s, t, _) in enumerate(part):
                with graph.inserting_after(call):
                    item = graph.call_function(operator.getitem, (call, i))
                item.meta.update(s.node.meta)
                s.node.replace_all_uses_with(item)
                replaced[s.node] = item
                orphans.extend(s.node.all_input_nodes)
                graph.erase_node(s.node)
                s.rewritten = True
                s.rule = ("stat-topk z=" if per_token else "wina t=" if channel else "teal t=") + f"{t:.4g}" + \
                    (f" (shared x{len(part)})" if len(part) > 1 else "")
            ctx.stats.sparse_linear_calls += 1
            ctx.stats.masked_sites += len(part)
    erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()


def _cutoffs(gm: fx.GraphModule, site: Site, t: float):
    """``t / ||W[:, i]||`` for each input channel i of the site (the weight as compiled; under
    tensor parallelism the rank's input channels, with the norms of the whole columns)."""
    if site.param is not None and site.param is not site.weight:  # the local shard of a DTensor
        w = weight_value(gm, site.param)
        return wina_cutoffs_from_norms(column_norms(w), t).to(w.device)
    w = weight_value(gm, site.weight).detach()
    return wina_cutoffs(w if site.kind == "linear" else w.t(), t).to(w.device)


def _emit_dense(graph: fx.Graph, x: fx.Node, part, per_token: bool, first: fx.Node,
                orphans: list[fx.Node]) -> None:
    """The masked linears of one input as torch ops: one masked copy of ``x`` per threshold,
    then each linear as it was (Inductor fuses the mask into the producer of ``x``)."""
    copies: dict[float, fx.Node] = {}
    note = f" (dense, {static_rows(x)} rows)"
    for s, t, _ in part:
        if t not in copies:
            with graph.inserting_before(first):
                copies[t] = graph.call_function(masked_input, (x, t, per_token))
        s.node.replace_input_with(x, copies[t])
        s.rewritten = True
        s.rule = ("stat-topk z=" if per_token else "teal t=") + f"{t:.4g}" + note
