"""Mask insertion: rewrite the sites a plan names into actsparse ops.

* CATS rules on a gated MLP's down projection replace ``down(act(gate x) * up x)`` with one
  ``actsparse::gated_mlp`` call (on a plain MLP the activation mask is the down input's mask,
  so it becomes an input threshold on the down projection).
* Input thresholds (TEAL) and statistical top-k rules group the linears that share one input
  and replace them with one ``actsparse::sparse_linear`` call, one output per linear.
* With a WINA plan (``plan.score == "wina"``) the threshold t of a linear applies to
  ``|x_i| * ||W[:, i]||``; the rewrite computes the per-channel cutoffs ``t / ||W[:, i]||`` once
  from the weights being compiled, registers them with the op module, and calls
  ``actsparse::channel_sparse_linear``.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..plan import SparsityPlan
from .dense_choice import masked_gated_mlp, masked_input, run_dense, static_rows
from .sites import Site

sparse_linear_op = torch.ops.actsparse.sparse_linear.default
channel_sparse_linear_op = torch.ops.actsparse.channel_sparse_linear.default
gated_mlp_op = torch.ops.actsparse.gated_mlp.default


@dataclass
class RewriteStats:
    """What a rewrite did: counts for tests, names for the unfound-rule report."""

    sparse_linear_calls: int = 0
    gated_mlp_calls: int = 0
    masked_sites: int = 0
    found_rules: set[str] = field(default_factory=set)
    unresolved: list[str] = field(default_factory=list)  # site names no plan name fits


def resolve_names(sites: list[Site], plan: SparsityPlan) -> dict[str, str]:
    """Map each site's graph module name to the plan's (absolute) name for it.

    Names match exactly when the whole model was traced as one graph. A graph traced from a
    submodule's frame (a compiled submodule, or a graph break inside a decoder layer) names
    its modules relative to that submodule; such a graph is mapped only if one prefix makes
    every one of its names a module of the plan's model. A decoder layer's frame fits every
    layer equally (and Dynamo reuses its graph across layers), so it stays unmapped, dense,
    and its rules are reported as not found.
    """
    known = set((plan.model or {}).get("weights", {})) or plan.rule_names()
    names = [s.module for s in sites]
    if any(n in known for n in names):  # rooted at the model (a tied head may not be linear)
        return {n: n for n in names if n in known}
    prefixes: set[str] | None = None
    for n in names:
        cands = {k[: -len(n)] for k in known if k.endswith("." + n)}
        if cands:
            prefixes = cands if prefixes is None else prefixes & cands
    if prefixes and len(prefixes) == 1:
        p = prefixes.pop()
        return {n: p + n for n in names}
    return {}


def _weight_arg(graph: fx.Graph, site: Site) -> fx.Node:
    """The weight in nn.Linear layout [out, in]: Conv1D's [in, out] weight gets a ``t()`` view."""
    if site.kind == "linear":
        return site.weight
    with graph.inserting_before(site.node):
        return graph.call_method("t", (site.weight,))


def _weight_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The real weight tensor behind a graph node (a Dynamo input or a module attribute)."""
    if node.op == "placeholder":
        arg = node.meta.get("grapharg")
        value = getattr(arg, "example", None)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return value
    elif node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    raise ValueError(f"a WINA plan needs the weight values at compile time; {node.name} has none "
                     "(compile the model itself with backend='sparse')")


def _channel_cutoffs(gm: fx.GraphModule, site: Site, t: float) -> int:
    """Register ``t / ||W[:, i]||`` for each input channel i of the site; returns its id."""
    from ..kernels.ops import register_channel_cutoffs
    from ..kernels.reference import wina_cutoffs

    w = _weight_value(gm, site.weight).detach()
    return register_channel_cutoffs(wina_cutoffs(w if site.kind == "linear" else w.t(), t))


def _replace(site: Site, new: fx.Node) -> None:
    site.node.replace_all_uses_with(new)


def _erase_orphans(graph: fx.Graph, candidates: list[fx.Node]) -> None:
    """Erase the nodes a rewrite left without users, and what only they used.

    Not ``graph.eliminate_dead_code()``: Dynamo graphs hold in-place updates (static KV cache
    ``index_copy_``) whose results nobody uses, and those must stay.
    """
    stack = list(candidates)
    while stack:
        n = stack.pop()
        if n.graph is not graph or n.users or n.op not in ("call_function", "call_method"):
            continue
        if n.op == "call_method" and str(n.target).endswith("_"):
            continue
        if n.op == "call_function" and (n.is_impure() or getattr(n.target, "__name__", "").endswith("_")):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


def insert_masks(gm: fx.GraphModule, sites: list[Site], plan: SparsityPlan,
                 sparsity_hints: dict[str, float] | None = None) -> RewriteStats:
    """Rewrite ``gm`` in place according to ``plan``; returns what was done."""
    stats = RewriteStats()
    graph = gm.graph
    names = resolve_names(sites, plan)
    stats.unresolved = [s.module for s in sites if s.module not in names]
    hints = sparsity_hints or {}

    def hint(module: str) -> float:
        return float(hints.get(module, plan.measured.get(module, plan.target or 0.0) or 0.0))

    handled: set[fx.Node] = set()
    orphans: list[fx.Node] = []

    # 1. CATS rules on the down projection of an MLP.
    for s in sites:
        pname = names.get(s.module)
        if s.role != "mlp_down" or pname not in plan.activation_thresholds:
            continue
        t = plan.activation_thresholds[pname]
        stats.found_rules.add(pname)
        if not s.gated:
            continue  # plain MLP: handled below as the down input's threshold
        gate, up = s.gated["gate"], s.gated["up"]
        clash = [names.get(x.module) for x in (gate, up, s) if names.get(x.module) in plan.thresholds]
        if clash:
            raise ValueError(f"plan has both a CATS rule on {pname} and input thresholds on {clash}; "
                             "an MLP takes one or the other")
        dense = run_dense(gate.input, gate.in_features, [gate.out_features], hint(pname), gated=True)
        with graph.inserting_before(s.node):
            args = (gate.input, gate.weight, up.weight, s.weight, gate.bias, up.bias, s.bias, s.act, t)
            new = graph.call_function(masked_gated_mlp, args) if dense else \
                graph.call_function(gated_mlp_op, args + (False, hint(pname)))
        new.meta.update(s.node.meta)
        _replace(s, new)
        orphans.extend(s.node.all_input_nodes)
        graph.erase_node(s.node)
        handled.update({s.node, gate.node, up.node})
        for x in (gate, s, up):
            x.rule = f"cats t={t:.4g}" + _dense_note(dense, gate.input)
        stats.gated_mlp_calls += 1
        stats.masked_sites += 1

    # 2. Input thresholds and statistical top-k, grouped by shared input.
    groups: dict[fx.Node, list[tuple[Site, float, bool]]] = defaultdict(list)
    st = plan.stat_topk
    for s in sites:
        if s.node in handled:
            continue
        pname = names.get(s.module)
        if pname in plan.thresholds:
            groups[s.input].append((s, plan.thresholds[pname], False))
            stats.found_rules.add(pname)
        elif s.role == "mlp_down" and pname in plan.activation_thresholds and not s.gated:
            groups[s.input].append((s, plan.activation_thresholds[pname], False))
        elif st is not None and s.role in st.roles and st.sparsity > 0:
            groups[s.input].append((s, st.multiplier, True))

    wina = plan.score == "wina"
    for x, members in groups.items():
        # per-token (statistical) and fixed thresholds never share one call
        for per_token in (False, True):
            part = [m for m in members if m[2] == per_token]
            if not part:
                continue
            first = min((m[0].node for m in part), key=_order(graph))
            channel = wina and not per_token
            sparsity_hint = max(hint(names.get(m[0].module, m[0].module)) for m in part)
            if not channel and run_dense(x, part[0][0].in_features, [m[0].out_features for m in part],
                                         sparsity_hint):
                _rewrite_dense(graph, x, part, per_token, first, orphans)
                stats.masked_sites += len(part)
                continue
            with graph.inserting_before(first):
                weights = [_weight_arg(graph, m[0]) for m in part]
                if channel:
                    cutoffs = [_channel_cutoffs(gm, m[0], m[1]) for m in part]
                    call = graph.call_function(channel_sparse_linear_op, (
                        x, weights, [m[0].bias for m in part], cutoffs, sparsity_hint))
                else:
                    call = graph.call_function(sparse_linear_op, (
                        x, weights, [m[0].bias for m in part], [m[1] for m in part], per_token,
                        sparsity_hint))
            for i, (s, t, _) in enumerate(part):
                with graph.inserting_after(call):
                    item = graph.call_function(operator.getitem, (call, i))
                item.meta.update(s.node.meta)
                _replace(s, item)
                orphans.extend(s.node.all_input_nodes)
                graph.erase_node(s.node)
                s.rule = ("stat-topk z=" if per_token else "wina t=" if channel else "teal t=") + f"{t:.4g}" + \
                    (f" (shared x{len(part)})" if len(part) > 1 else "")
            stats.sparse_linear_calls += 1
            stats.masked_sites += len(part)

    _erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()
    return stats


def _dense_note(dense: bool, x: fx.Node) -> str:
    return f" (dense, {static_rows(x)} rows)" if dense else ""


def _rewrite_dense(graph: fx.Graph, x: fx.Node, part, per_token: bool, first: fx.Node,
                   orphans: list[fx.Node]) -> None:
    """The masked linears of one input as torch ops: one masked copy of ``x`` per threshold,
    then the linear on it (Inductor fuses the mask into the producer of ``x``)."""
    masked: dict[float, fx.Node] = {}
    for s, t, _ in part:  # `first` stays in the graph until every member is rewritten
        with graph.inserting_before(first):
            if t not in masked:
                masked[t] = graph.call_function(masked_input, (x, t, per_token))
            w = s.weight if s.kind == "linear" else graph.call_method("t", (s.weight,))
            new = graph.call_function(torch.nn.functional.linear, (masked[t], w, s.bias))
        new.meta.update(s.node.meta)
        _replace(s, new)
        s.rule = ("stat-topk z=" if per_token else "teal t=") + f"{t:.4g}" + _dense_note(True, x)
    for s, _, _ in part:
        orphans.extend(s.node.all_input_nodes)
        graph.erase_node(s.node)


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]
