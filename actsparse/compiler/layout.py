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


def is_input_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.stride(0) == 1 and w.stride(1) == w.shape[0]


def to_input_major(param: torch.Tensor) -> bool:
    """Re-store a 2-D parameter input-major, in place; True if anything changed."""
    if param.dim() != 2 or is_input_major(param) or param.shape[0] == 1 or param.shape[1] == 1:
        return False
    with torch.no_grad():
        param.data = param.data.t().contiguous().t()
    return True


def prepare(model: torch.nn.Module, plan: SparsityPlan) -> int:
    """Store the weights that ``plan`` masks input-major, before ``torch.compile``.

    Optional: the backend does the same lazily after a graph's first call, which costs one
    recompilation of that graph. Returns the number of weights re-stored.
    """
    plan.validate(model)
    mods = dict(model.named_modules())
    return sum(to_input_major(mods[n].weight) for n in plan.input_major_modules(model))
