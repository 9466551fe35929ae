"""Predicted-sparse gated MLP: a learned predictor picks the neurons, the MLP runs only those.

Two ops, both inserted by ``actsparse.passes.insert_predictors``:

* ``actsparse::predict_mask(x, key, neurons, keep, threshold, topk)``: the predictor,
  ``logits = (x W1^T) W2^T + b2``; the mask keeps the ``keep`` largest logits of each token
  (``topk``) or those above ``threshold``. The predictor's weights are not graph inputs (a
  backend cannot add inputs to Dynamo's graph, and Inductor rejects real tensors as graph
  attributes): the pass registers them under ``key`` (``register_predictor``), cast to the MLP
  weights' device and dtype, and the op looks them up. They stay put, so CUDA graphs replay.
* ``actsparse::predicted_mlp(x, mask, w_gate, w_up, w_down, ...)``: the gated MLP on the masked
  neurons, ``down(where(mask, act(gate x) * up x, 0))``. Unlike CATS, the gate is masked too:
  only the predicted rows of gate and up (output-sparse) and the matching rows of the
  input-major down weight (input-sparse) are read.

The op picks its path at run time like the other actsparse ops: the Triton kernel for few
token rows on CUDA, a gather of the active rows for few rows on the CPU, and the dense matmuls
with the mask applied for many rows (prefill) or a nearly dense union of masks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .reference import activation


def predictor_logits(x: Tensor, w1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The low-rank predictor's logits, one per neuron: ``(x W1^T) W2^T + b2``."""
    return F.linear(F.linear(x, w1), w2, b2)


def select(logits: Tensor, keep: int, threshold: float, topk: bool) -> Tensor:
    """Boolean mask of the selected neurons: the ``keep`` largest logits per token, or ``> threshold``.

    Top-k is written as ``logits >= k-th largest``: a static shape, no scatter (ties at the
    k-th value, which practically never happen in floating point, keep a few more).
    """
    if topk:
        kth = torch.topk(logits, keep, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        return logits >= kth
    return logits > threshold


def predicted_mask(x: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, keep: int, threshold: float,
                   topk: bool) -> Tensor:
    """The predictor and its selection, as inserted into the graph (traced through by Inductor)."""
    return select(predictor_logits(x, w1, w2, b2), keep, threshold, topk)


#: key -> (w1, w2, b2), filled by the predictor pass before the graph is compiled.
_PREDICTORS: dict[str, tuple[Tensor, Tensor, Tensor]] = {}


def register_predictor(key: str, w1: Tensor, w2: Tensor, b2: Tensor) -> str:
    """Make a predictor's weights available to ``actsparse::predict_mask`` under ``key``."""
    _PREDICTORS[key] = (w1, w2, b2)
    return key


def clear_predictors() -> None:
    """Forget every registered predictor (graphs compiled with them can no longer run)."""
    _PREDICTORS.clear()


@torch.library.custom_op("actsparse::predict_mask", mutates_args=())
def predict_mask(x: Tensor, key: str, neurons: int, keep: int, threshold: float, topk: bool) -> Tensor:
    """The registered predictor ``key`` on ``x`` [..., d]: a boolean mask [..., neurons]."""
    try:
        w1, w2, b2 = _PREDICTORS[key]
    except KeyError:
        raise RuntimeError(f"actsparse: predictor {key!r} is not registered (compile the model with "
                           "the plan again)") from None
    return predicted_mask(x, w1, w2, b2, keep, threshold, topk)


@predict_mask.register_fake
def _(x, key, neurons, keep, threshold, topk):
    return x.new_empty(*x.shape[:-1], neurons, dtype=torch.bool)


def predicted_mlp_reference(x: Tensor, mask: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                            b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
                            act: str) -> Tensor:
    """``down(where(mask, act(gate x) * up x, 0))`` in fp32, cast to x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    m2 = mask.reshape(-1, mask.shape[-1])
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    g = activation(act, F.linear(x2, w_gate.float(), f32(b_gate)))
    h = torch.where(m2, g * F.linear(x2, w_up.float(), f32(b_up)), torch.zeros(()))
    out = F.linear(h, w_down.float(), f32(b_down))
    return out.to(x.dtype).reshape(*lead, w_down.shape[0])


@torch.library.custom_op("actsparse::predicted_mlp", mutates_args=())
def predicted_mlp(
    x: Tensor,
    mask: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor],
    b_up: Optional[Tensor],
    b_down: Optional[Tensor],
    act: str,
    sparsity_hint: float,
) -> Tensor:
    """Gated MLP on the neurons ``mask`` [..., n] selects; see the module docstring."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m2 = mask.reshape(-1, mask.shape[-1])
    rows = x2.shape[0]
    no_bias = b_gate is None and b_up is None and b_down is None
    if x.is_cuda and no_bias and 0 < rows <= ops.TRITON_MAX_ROWS and ops._triton() is not None:
        from .triton import predicted_mlp as tri

        out = tri.predicted_mlp(x2.contiguous(), m2.contiguous(), w_gate, w_up, w_down, act,
                                sparsity_hint=sparsity_hint)
        return out.reshape(*lead, out.shape[-1])
    zero = ops._zero(x2)
    if not x.is_cuda and rows <= ops.GATHER_MAX_ROWS:
        active = m2.any(0)
        if int(active.sum()) <= ops.GATHER_MAX_DENSITY * m2.shape[1]:
            idx = active.nonzero().squeeze(1)
            sub = lambda b: None if b is None else b[idx]  # noqa: E731
            g = activation(act, F.linear(x2, w_gate.index_select(0, idx), sub(b_gate)))
            u = F.linear(x2, w_up.index_select(0, idx), sub(b_up))
            h = torch.where(m2[:, idx], g * u, zero)
            out = h @ ops._gather_rows(w_down, idx)
            out = out if b_down is None else out + b_down
            return out.reshape(*lead, out.shape[-1])
    g = activation(act, F.linear(x2, w_gate, b_gate))
    h = torch.where(m2, g * F.linear(x2, w_up, b_up), zero)
    out = F.linear(h, w_down, b_down)
    return out.reshape(*lead, out.shape[-1])


@predicted_mlp.register_fake
def _(x, mask, w_gate, w_up, w_down, b_gate, b_up, b_down, act, sparsity_hint):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


predicted_mlp_op = torch.ops.actsparse.predicted_mlp.default
predict_mask_op = torch.ops.actsparse.predict_mask.default

__all__ = ["clear_predictors", "predict_mask", "predict_mask_op", "predicted_mask", "predicted_mlp",
           "predicted_mlp_op", "predicted_mlp_reference", "predictor_logits", "register_predictor", "select"]
