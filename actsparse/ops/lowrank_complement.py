"""``actsparse::lowrank_complement``: the low-rank part of a sparse + low-rank (R-Sparse) linear.

``A (B (x * (|x| <= t)))``: the input channels a TEAL-style mask drops, through a rank-r
factorisation of the weight. The sparse part is an ordinary ``sparse_linear`` on the same
threshold; the pass adds the two. The factors (``B`` [r, in], ``A`` [out, r]) are backend
constants (``actsparse.ops.constants``) cast to the weight's device and dtype; the op gets
their key. Two thin dense products: at batch 1 they read ``r * (in + out)`` weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import constants
from .reference import input_mask, lowrank_complement_reference
from .spec import define_op


def _lowrank_complement(x: Tensor, key: str, out_features: int, threshold: float) -> Tensor:
    """``A (B x_c)`` with ``x_c = x`` where ``|x| <= t``, else 0 (factors registered under ``key``)."""
    a, b = constants.lookup(key)
    xc = torch.where(input_mask(x, threshold), torch.zeros((), dtype=x.dtype, device=x.device), x)
    return F.linear(F.linear(xc, b), a)


def _fake(x, key, out_features, threshold):
    return x.new_empty(*x.shape[:-1], out_features)


def _reference(x, key, out_features, threshold):
    a, b = constants.lookup(key)
    return lowrank_complement_reference(x, a, b, threshold)


SPEC = define_op("lowrank_complement", _lowrank_complement, _fake, reference=_reference)
lowrank_complement = SPEC.op
