"""Small helpers on Dynamo FX graphs that several passes share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx

from ..ops.dispatch import sparse_pays


def example_value(node: fx.Node):
    """The fake tensor Dynamo recorded for a node, if any."""
    return node.meta.get("val", node.meta.get("example_value"))


def static_rows(x: fx.Node) -> int | None:
    """Token rows of a linear input (all dims but the last), or None if unknown or symbolic."""
    v = example_value(x)
    if not isinstance(v, torch.Tensor) or v.dim() < 1:
        return None
    dims = v.shape[:-1]
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


def run_dense(x: fx.Node, k: int, ns: Sequence[int], sparsity: float, gated: bool = False) -> bool:
    """Whether the masked linears on input ``x`` should be emitted as their masked dense form for
    the rows this graph was traced with (False where the rows are unknown or symbolic: the op
    then decides at run time)."""
    rows = static_rows(x)
    v = example_value(x)
    if rows is None or rows == 0 or not isinstance(v, torch.Tensor):
        return False
    if v.device.type not in ("cpu", "cuda"):
        return False
    return not sparse_pays(v.device.type, rows, k, ns, sparsity, v.element_size(), gated)


def weight_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The real tensor behind a graph node (a Dynamo input or a module attribute)."""
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
    raise ValueError(f"the weight values are needed at compile time; {node.name} has none "
                     "(compile the model itself with backend='sparse')")


def replace_node(graph: fx.Graph, old: fx.Node, new: fx.Node, orphans: list[fx.Node]) -> None:
    """Put ``new`` in ``old``'s place (its users and metadata) and erase ``old``; its inputs go to
    ``orphans`` for ``erase_orphans`` once the pass is done."""
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    orphans.extend(old.all_input_nodes)
    graph.erase_node(old)


def mark_rewritten(sites, rule: str) -> None:
    """Record on each site the rule that now runs it, so no later rule rewrites it again."""
    for x in sites:
        x.rule = rule
        x.rewritten = True


def erase_orphans(graph: fx.Graph, candidates: list[fx.Node]) -> None:
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


def node_order(graph: fx.Graph):
    """A sort key that puts nodes in graph order."""
    pos = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: pos[n]
