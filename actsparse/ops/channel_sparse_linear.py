"""``actsparse::channel_sparse_linear``: linears sharing one input, one cutoff per input channel.

WINA plans reach here: masking ``|x_k| * ||W[:, k]|| > t`` is ``|x_k| > t / ||W[:, k]||``. The
rewrite computes those cutoff vectors from the weights it compiles and registers them as
backend constants (``actsparse.ops.constants``), one entry per call holding one vector per
output; the op receives its key. Dispatch and
input-sparse weights as ``sparse_linear``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import constants
from .reference import sparse_linear_reference
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


def _reference(x, weights, biases, cutoffs_key, sparsity_hint):
    return sparse_linear_reference(x, weights, biases, _cutoffs(cutoffs_key, x.device))


SPEC = define_op("channel_sparse_linear", _channel_sparse_linear, _fake, reference=_reference,
                 input_sparse=("weights",), reserve=_reserve)
channel_sparse_linear = SPEC.op
