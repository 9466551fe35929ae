"""``actsparse::route_heads``: a head router's choice of the attention units that run, per token.

``logits = x W^T + b`` (one score per unit); the ``keep`` best units' indices, int64
[..., keep] in no particular order. The router's weights are backend constants
(``actsparse.ops.constants``) registered by the head-routing pass, cast to the block's dtype
and device; the op receives their key. It reads no model weights input-sparse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import constants
from .spec import define_op


def _route_heads(x: Tensor, key: str, keep: int) -> Tensor:
    """The registered router ``key`` on ``x`` [..., d]: unit indices [..., keep]."""
    w, b = constants.lookup(key)
    return torch.topk(F.linear(x, w, b).float(), keep, dim=-1, sorted=False).indices


def _fake(x, key, keep):
    return x.new_empty(*x.shape[:-1], keep, dtype=torch.int64)


SPEC = define_op("route_heads", _route_heads, _fake)
route_heads = SPEC.op
