"""What a Dynamo graph of a tensor-parallel model holds: DTensor values, and how a weight is split.

Dynamo traces a model sharded with ``torch.distributed.tensor.parallel`` (or loaded by Hugging
Face with a ``tp_plan``) with its parameters as DTensor placeholders of the *global* shape; the
local shard appears where the model calls ``.to_local()`` (Hugging Face's inference path) or
where ``localize_dtensor`` puts it (PyTorch's ColwiseParallel / RowwiseParallel, which run the
linear on DTensors). These helpers read such values; they never need a process group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..plan.sharding import Shard


def is_dtensor(value: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 - a torch built without distributed: nothing is a DTensor
        return False
    return isinstance(value, DTensor)


def value_of(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def weight_shard(value: Any) -> Shard | None:
    """How a 2-D DTensor weight [out, in] is split over the ranks: sharded on one mesh dimension
    (replicated on any other), else None (replicated everywhere, or a layout we do not slice)."""
    if not is_dtensor(value) or value.dim() != 2:
        return None
    placements, mesh = value.placements, value.device_mesh
    shards = [(i, p) for i, p in enumerate(placements) if p.is_shard()]
    if len(shards) != 1 or not all(p.is_replicate() for i, p in enumerate(placements) if i != shards[0][0]):
        return None
    mdim, p = shards[0]
    index = mesh.get_local_rank(mdim) if mesh.ndim > 1 else mesh.get_local_rank()
    return Shard(p.dim % 2, int(index), int(mesh.size(mdim)))


def local_weight(node: fx.Node) -> tuple[fx.Node, Shard | None] | None:
    """For ``w = p.to_local()`` with ``p`` a DTensor placeholder: (p, how p is split); None otherwise."""
    if node.op != "call_method" or node.target != "to_local" or not node.args:
        return None
    p = node.args[0]
    if not isinstance(p, fx.Node) or p.op != "placeholder" or not is_dtensor(value_of(p)):
        return None
    return p, weight_shard(value_of(p))


def column_norms(param: Any) -> torch.Tensor:
    """float64 norms of the columns of a (real) weight [out, in] that this rank's input channels
    meet: a DTensor parameter's local columns, summed over the ranks where its rows are split
    (column-parallel: a collective at compile time, which every rank reaches compiling the same
    graph); the whole weight's otherwise."""
    if not is_dtensor(param):
        return param.detach().double().norm(dim=0)
    sq = param.to_local().detach().double().pow(2).sum(0)
    shard = weight_shard(param)
    if shard is not None and shard.dim == 0 and shard.degree > 1:
        import torch.distributed as dist

        mesh = param.device_mesh
        mdim = next(i for i, p in enumerate(param.placements) if p.is_shard())
        dist.all_reduce(sq, group=mesh.get_group(mdim))
    return sq.sqrt()
