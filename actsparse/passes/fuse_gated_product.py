"""Gated MLP product into the gate/up call: ``act(g) * u`` of one ``sparse_linear`` call becomes
one ``actsparse::sparse_gated_product`` call.

After ``insert_masks`` a gated MLP with input masks on gate and up reads
``mul(act(getitem(call, i)), getitem(call, j))``: the call, then a separate elementwise kernel for
the product, whose output the down projection reads. The fused op computes the product where the
sums are finished, so a decode step runs one launch fewer per layer and writes no gate/up
activations. Only calls with exactly gate and up, of one width and without biases, whose outputs
are used by the product alone, are fused; anything else stays as it was.

``"auto"`` (the default) fuses only calls whose weights are on a CUDA device: on the CPU there is
no launch to save, and the product inside the op runs as separate eager kernels, where Inductor
fuses it into one loop (measured a few percent slower fused).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops.sparse_gated_product import sparse_gated_product as gated_product_op
from ..ops.sparse_linear import sparse_linear as sparse_linear_op
from ..ops.spec import bound_args
from .context import PassContext
from .find_sites import activation_of
from .graph import erase_orphans, replace_node


def _example(n):
    """The traced example (a fake tensor) of a graph node, or None."""
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, fx.Node) else None


def _only_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _match(call: fx.Node, args: dict) -> tuple[int, str, fx.Node] | None:
    """(index of the gate output, activation, product node) if ``call`` feeds a gated product only."""
    weights, biases = args["weights"], args["biases"]
    if len(weights) != 2 or any(b is not None for b in biases):
        return None
    items = {}
    for u in call.users:
        if u.op != "call_function" or u.target is not operator.getitem:
            return None
        items[u.args[1]] = u
    if sorted(items) != [0, 1]:
        return None
    shapes = [_example(w) for w in weights]
    if not all(isinstance(s, torch.Tensor) for s in shapes) or shapes[0].shape[0] != shapes[1].shape[0]:
        return None
    for gi in (0, 1):
        act = _only_user(items[gi])
        name = activation_of(act) if act is not None else None
        if name is None or act.args[0] is not items[gi]:
            continue
        prod = _only_user(act)
        other = items[1 - gi]
        if prod is None or prod.op != "call_function" or prod.target not in (operator.mul, torch.mul):
            continue
        if set(prod.args) == {act, other} and len(prod.args) == 2 and _only_user(other) is prod:
            return gi, name, prod
    return None


def _on_cuda(w) -> bool:
    v = _example(w)
    return isinstance(v, torch.Tensor) and v.device.type == "cuda"


def fuse_gated_product(gm: fx.GraphModule, ctx: PassContext) -> None:
    if ctx.fuse_gated_product is False:
        return
    graph = gm.graph
    orphans: list[fx.Node] = []
    for call in list(graph.nodes):
        if call.op != "call_function" or call.target is not sparse_linear_op:
            continue
        args = bound_args(call)
        hit = _match(call, args)
        if hit is None:
            continue
        gi, act, prod = hit
        if ctx.fuse_gated_product == "auto" and not _on_cuda(args["weights"][0]):
            continue
        order = (gi, 1 - gi)
        with graph.inserting_before(prod):
            new = graph.call_function(gated_product_op, (
                args["x"], [args["weights"][i] for i in order], [args["thresholds"][i] for i in order], act,
                args["per_token"], args["sparsity_hint"]))
        replace_node(graph, prod, new, orphans)
        ctx.stats.gated_product_calls += 1
    if orphans:
        erase_orphans(graph, orphans)
        graph.lint()
        gm.recompile()
