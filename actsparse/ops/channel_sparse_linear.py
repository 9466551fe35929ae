"""``actsparse::channel_sparse_linear``: linears sharing one input, one cutoff per input channel.

WINA plans reach here: masking ``|x_k| * ||W[:, k]|| > t`` is ``|x_k| > t / ||W[:, k]||``. The
rewrite computes those cutoff vectors from the weights it compiles and registers them as
backend constants (``actsparse.ops.constants``), one entry per call holding one vector per
output; the op receives its key. Dispatch and
input-sparse weights as ``sparse_linear``.

The backward (grad-mode calls) differentiates the reference with the masks held fixed. The
masks come from ``actsparse::channel_keep``, an opaque op of its own: AOTAutograd traces the
backward with fake tensors, and reading the real cutoff tensors there would mix them in (a
fake-tensor error under Inductor); the op looks them up only when it runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import constants
from .reference import input_mask, sparse_linear_reference
from .sparse_linear import _reserve, run_masked_linears
from .spec import define_op


def _cutoffs(key: str, device) -> list[Tensor]:
    return [tau if tau.device == device else tau.to(device) for tau in constants.lookup(key)]


def _channel_sparse_linear(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                           cutoffs_key: str, sparsity_hint: float) -> list[Tensor]:
    """Linears sharing one input, each on ``x * (|x| > tau_i)`` with a cutoff vector ``tau_i``."""
    return run_masked_linears(x, list(weights), list(biases), _cutoffs(cutoffs_key, x.device), False, sparsity_hint)


def _fake(x, weights, biases, cutoffs_key, sparsity_hint):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


def _channel_keep(x: Tensor, cutoffs_key: str, outputs: int) -> Tensor:
    """The masks ``|x| > tau_i`` of the registered cutoff vectors, stacked: bool [outputs, *x.shape]."""
    taus = _cutoffs(cutoffs_key, x.device)
    if len(taus) != outputs:
        raise RuntimeError(f"actsparse: constant {cutoffs_key!r} holds {len(taus)} cutoff vectors, "
                           f"the call has {outputs} outputs")
    k = x.shape[-1]
    return torch.stack([input_mask(x.reshape(-1, k), t).reshape(x.shape) for t in taus])


def _channel_keep_fake(x, cutoffs_key, outputs):
    return x.new_empty((outputs, *x.shape), dtype=torch.bool)


KEEP_SPEC = define_op("channel_keep", _channel_keep, _channel_keep_fake)
channel_keep = KEEP_SPEC.op


def _reference(x, weights, biases, cutoffs_key, sparsity_hint):
    # The reference on x masked by the opaque op's |x| > tau_i (see the module docstring), then
    # with threshold 0: |x| > tau_i implies x != 0 (the cutoffs are >= 0), so the masks agree.
    keep = channel_keep(x.detach(), cutoffs_key, len(weights))
    return [sparse_linear_reference(torch.where(keep[i], x, torch.zeros((), dtype=x.dtype, device=x.device)),
                                    [w], [b], [0.0])[0] for i, (w, b) in enumerate(zip(weights, biases))]


SPEC = define_op("channel_sparse_linear", _channel_sparse_linear, _fake, reference=_reference,
                 input_sparse=("weights",), reserve=_reserve)
channel_sparse_linear = SPEC.op
