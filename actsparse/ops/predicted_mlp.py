"""``actsparse::predicted_mlp``: a gated MLP on the neurons a predictor chose.

``down(where(mask, act(gate x) * up x, 0))``. Unlike CATS the gate is masked too: only the
predicted rows of gate and up (output-sparse, row-major) and the matching rows of the
input-major down weight are read. Input-sparse weights: ``w_down``.

Dispatch as ``gated_mlp``: the Triton kernels for few rows on CUDA, a gather of the active
neurons for few rows on the CPU, else the masked dense form.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .dense import masked_predicted_mlp
from .dispatch import choose
from .gated_mlp import _reserve, contiguous_bias, masked_mlp_gathered
from .reference import predicted_mlp_reference
from .spec import define_op


def _predicted_mlp(x: Tensor, mask: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                   b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor], act: str,
                   sparsity_hint: float) -> Tensor:
    """Gated MLP on the neurons ``mask`` [..., n] selects."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m2 = mask.reshape(-1, mask.shape[-1])
    out = None
    # the cost model reads the gate in full (CATS); here it is skipped too, so sparse pays at least as well
    path, tri = choose(x2, k, [w_gate.shape[0]], sparsity_hint, w_gate.element_size(), gated=True)
    if path == "triton":
        out = tri.launch_gated_mlp(x2.contiguous(), w_gate, w_up, w_down, act, mask=m2.contiguous(),
                                   sparsity_hint=sparsity_hint, b_gate=contiguous_bias(b_gate),
                                   b_up=contiguous_bias(b_up), b_down=b_down)
    elif path == "cpu":
        out = masked_mlp_gathered(x2, m2, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    if out is None:
        out = masked_predicted_mlp(x2, m2, w_gate, w_up, w_down, b_gate, b_up, b_down, act)
    return out.reshape(*lead, out.shape[-1])


def _fake(x, mask, w_gate, w_up, w_down, b_gate, b_up, b_down, act, sparsity_hint):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


def _reference(x, mask, w_gate, w_up, w_down, b_gate, b_up, b_down, act, sparsity_hint):
    return predicted_mlp_reference(x, mask, w_gate, w_up, w_down, b_gate, b_up, b_down, act)


SPEC = define_op("predicted_mlp", _predicted_mlp, _fake, reference=_reference, input_sparse=("w_down",),
                 reserve=_reserve)
predicted_mlp = SPEC.op
