"""Bring PyTorch's tensor-parallel linears to their local form, so the passes find them as sites.

``torch.distributed.tensor.parallel``'s ColwiseParallel / RowwiseParallel run the linear on
DTensors; Dynamo's graph holds (with ``use_local_output=True``)::

    xd = DTensor.from_local(x, mesh, (Replicate(),))     # row-parallel: (Shard(-1),)
    yd = linear(xd, w, b)                                # w: a DTensor parameter, Shard(0) / Shard(1)
    y  = yd.redistribute(placements=...).to_local()      # row-parallel: Partial -> Replicate, the all-reduce

The pass rewrites the linear to run on the local shards, as Hugging Face's inference path
already does (``x @ w.to_local().T``), and wraps its result back into a DTensor of the same
placements, so DTensor's own ``redistribute`` still does the collectives where they were.
A row-parallel bias is added by DTensor after the partial result, once. Where the
redistribution of a column-parallel output is a no-op, the wrap and unwrap are dropped, so the
MLP's ``act(gate) * up`` and the attention's q/k/v are plain tensors again, as site discovery
expects. Linears of any other layout are left alone (they run dense).

In both forms the ``to_local`` of each weight is then moved up to the graph's inputs, where a
plain parameter's placeholder is: the rewrites put one op for several linears (q/k/v, gate/up)
before the first of them, and every weight must be defined there.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import PassContext
from .dtensor import is_dtensor, local_weight, value_of, weight_shard
from .find_sites import _LINEAR_TARGETS
from .graph import erase_orphans


def _from_local_target():
    from torch.distributed.tensor import DTensor

    return DTensor.from_local


def _is_from_local(node) -> bool:
    """``DTensor.from_local`` (Dynamo records the classmethod; its module's function is the same)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return node.target is _from_local_target() or (
        getattr(node.target, "__name__", "") == "from_local"
        and "distributed.tensor" in (getattr(node.target, "__module__", "") or ""))


def _norm(placements, ndim: int) -> tuple:
    """Placements with Shard dims made non-negative (``Shard(-1)`` == ``Shard(ndim - 1)``)."""
    from torch.distributed.tensor import Shard

    return tuple(Shard(p.dim % ndim) if p.is_shard() else p for p in placements)


def _meta(node: fx.Node, value) -> fx.Node:
    node.meta["example_value"] = value
    return node


def localize_dtensor(gm: fx.GraphModule, ctx: PassContext) -> None:
    graph = gm.graph
    from_local = None
    changed, orphans = False, []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        wv, yv = value_of(w), value_of(node)
        if not (isinstance(w, fx.Node) and w.op == "placeholder" and is_dtensor(wv) and is_dtensor(yv)
                and _is_from_local(x)):
            continue
        shard = weight_shard(wv)
        xv = value_of(x)
        if shard is None or not is_dtensor(xv) or xv.device_mesh != wv.device_mesh:
            continue
        nd = xv.dim()
        want_x = _norm(xv.placements, nd)
        # column-parallel: the input is replicated; row-parallel: it is sharded on its channels
        if shard.dim == 0 and not all(p.is_replicate() for p in want_x):
            continue
        if shard.dim == 1 and not any(p.is_shard(nd - 1) for p in want_x):
            continue
        # a column-parallel output of uneven slices needs its global shape spelt out to from_local
        uneven = shard.dim == 0 and yv.shape[-1] != yv._local_tensor.shape[-1] * shard.degree
        if uneven and not all(isinstance(d, int) for d in yv.shape):
            continue
        from_local = from_local or _from_local_target()
        mesh = x.args[1] if len(x.args) > 1 else x.kwargs.get("device_mesh")
        with graph.inserting_before(node):
            xl = x.args[0]
            wl = _meta(graph.call_method("to_local", (w,)), wv._local_tensor)
            bl = None
            if b is not None and shard.dim == 0:
                bl = _meta(graph.call_method("to_local", (b,)), value_of(b)._local_tensor)
            yl = _meta(graph.call_function(node.target, (xl, wl, bl)), yv._local_tensor)
            kwargs = {"run_check": False}
            if uneven:
                kwargs.update(shape=tuple(yv.shape), stride=tuple(yv.stride()))
            yd = _meta(graph.call_function(from_local, (yl, mesh, yv.placements), kwargs), yv)
            out = yd
            if b is not None and shard.dim == 1:  # DTensor adds the replicated bias once
                out = _meta(graph.call_function(torch.add, (yd, b)), yv)
        yl.meta.update({k: v for k, v in node.meta.items() if k not in ("example_value", "val")})
        node.replace_all_uses_with(out)
        orphans.extend(node.all_input_nodes)
        graph.erase_node(node)
        changed = True
        if shard.dim == 0 and out is yd:
            _drop_noop_redistribute(graph, yd, yl, nd)
    if changed:
        erase_orphans(graph, orphans)
    changed |= _hoist_local_weights(graph)
    if changed:
        graph.lint()
        gm.recompile()


def _hoist_local_weights(graph: fx.Graph) -> bool:
    """Move each ``p.to_local()`` of a DTensor parameter up to the end of the placeholders.

    It depends on nothing else, and the rewrites insert one op for several linears (q/k/v,
    gate/up) before the first of them: every weight must be defined there, as a plain
    parameter's placeholder is (Hugging Face's inference path calls ``to_local`` just before
    each linear)."""
    nodes = list(graph.nodes)
    first = next((n for n in nodes if n.op != "placeholder"), None)
    moved = False
    for n in nodes:
        if first is None or n is first:
            continue
        if local_weight(n) is not None and not n.kwargs:
            first.prepend(n)
            moved = True
    return moved


def _drop_noop_redistribute(graph: fx.Graph, yd: fx.Node, yl: fx.Node, nd: int) -> None:
    """``from_local(yl).redistribute(same placements).to_local()`` is ``yl``: use it directly."""
    users = list(yd.users)
    if len(users) != 1:
        return
    r = users[0]
    if r.op != "call_method" or r.target != "redistribute":
        return
    placements = r.kwargs.get("placements", r.args[2] if len(r.args) > 2 else None)
    rv = value_of(r)
    if placements is None or not is_dtensor(rv) or _norm(rv.placements, nd) != _norm(value_of(yd).placements, nd):
        return
    if not r.users or not all(u.op == "call_method" and u.target == "to_local" and not u.kwargs
                               for u in r.users):
        return
    for u in list(r.users):
        u.replace_all_uses_with(yl)
        graph.erase_node(u)
    graph.erase_node(r)
    graph.erase_node(yd)
