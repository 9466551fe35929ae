"""``actsparse::predict_mask``: a learned predictor's choice of an MLP's active neurons.

``logits = (x W1^T) W2^T + b2``; the mask keeps the ``keep`` largest logits of each token
(``topk``) or those above ``threshold``. The predictor's weights are backend constants
(``actsparse.ops.constants``) registered by the predictor pass, cast to the MLP weights'
device and dtype; the op receives their key. It reads no model weights input-sparse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import constants
from .reference import predicted_mask
from .spec import define_op


def _predict_mask(x: Tensor, key: str, neurons: int, keep: int, threshold: float, topk: bool) -> Tensor:
    """The registered predictor ``key`` on ``x`` [..., d]: a boolean mask [..., neurons]."""
    w1, w2, b2 = constants.lookup(key)
    return predicted_mask(x, w1, w2, b2, keep, threshold, topk)


def _fake(x, key, neurons, keep, threshold, topk):
    return x.new_empty(*x.shape[:-1], neurons, dtype=torch.bool)


SPEC = define_op("predict_mask", _predict_mask, _fake)
predict_mask = SPEC.op
