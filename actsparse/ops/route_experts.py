"""``actsparse::route_experts``: a dense-to-MoE router's choice of an MLP's experts.

The router predicts each expert's output norm from the MLP input; an expert runs where its
prediction exceeds the layer's calibrated threshold (dynamic-k: the number of experts varies
per token). The router's tensors are backend constants (``actsparse.ops.constants``) in fp32,
registered by ``insert_experts``; the op receives their key. Scores are computed in fp32 so
every path selects the same experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import constants
from .reference import expert_mask
from .spec import define_op


def _route_experts(x: Tensor, key: str, experts: int, threshold: float) -> Tensor:
    """The registered router ``key`` on ``x`` [..., d]: a boolean mask [..., experts]."""
    return expert_mask(x, constants.lookup(key), threshold)


def _fake(x, key, experts, threshold):
    return x.new_empty(*x.shape[:-1], experts, dtype=torch.bool)


SPEC = define_op("route_experts", _route_experts, _fake)
route_experts = SPEC.op
