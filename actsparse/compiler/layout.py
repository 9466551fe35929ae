"""Input-major weight storage for masked sites, prepared in place.

An input-sparse linear reads the weights of its active input channels only. In nn.Linear's
row-major [out, in] storage those weights are scattered; stored input-major
(``W.t().contiguous().t()``: same logical shape and values, transposed memory) the weights of
one input channel are contiguous, so skipping a channel skips a whole row of memory. Dense
matmuls (prefill) run on the same storage, so nothing is duplicated.
"""

from __future__ import annotations

import torch

from ..plan import SparsityPlan


def _local(w: torch.Tensor) -> torch.Tensor:
    """The tensor a rank stores: a DTensor's local shard (tensor parallelism), else ``w``."""
    local = getattr(w, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else w


def is_input_major(w: torch.Tensor) -> bool:
    w = _local(w)
    return w.dim() == 2 and w.stride(0) == 1 and w.stride(1) == w.shape[0]


def to_input_major(param: torch.Tensor) -> bool:
    """Re-store a 2-D parameter input-major, in place; True if anything changed.

    A DTensor parameter (tensor parallelism) has its local shard re-stored: the ops read the
    shard (``to_local``), and ``.data`` of a DTensor does not reach it.
    """
    local = _local(param)
    if local.dim() != 2 or is_input_major(local) or local.shape[0] == 1 or local.shape[1] == 1:
        return False
    with torch.no_grad():
        if local is not param:  # a fresh tensor, not a view: Dynamo fakeifies a shard that is a view wrongly
            shard = torch.empty_strided(local.shape, (1, local.shape[0]), dtype=local.dtype, device=local.device)
            param._local_tensor = shard.copy_(local)
        else:
            param.data = param.data.t().contiguous().t()
    return True


def prepare(model: torch.nn.Module, plan: SparsityPlan) -> int:
    """Store the weights that ``plan`` masks input-major, before ``torch.compile``.

    Optional: the backend does the same lazily after a graph's first call, which costs one
    recompilation of that graph. Returns the number of weights re-stored.
    """
    plan.validate(model)
    mods = dict(model.named_modules())
    # shards of a tensor-parallel model: actsparse.distributed.shard stores them (the backend
    # cannot, and a model loaded by transformers with a tp_plan keeps them row-major)
    return sum(to_input_major(mods[n].weight) for n in plan.input_major_modules(model)
               if _local(mods[n].weight) is mods[n].weight)
