"""``actsparse::expert_mlp``: a gated MLP run on the experts a router selected.

After ``actsparse.moefy`` each expert is a contiguous block of neurons: rows of gate and up,
columns of down (rows of the input-major down weight). ``mask`` [..., E] says which experts
each token row runs; the result is ``down(where(expert_of_neuron_on, act(gate x) * up x, 0))``.
Input-sparse weights: ``w_down``.

Dispatch: the block-sparse Triton kernels for few rows on CUDA (no biases); on the CPU for few
rows, gate/up/down on the union of the rows' experts (the gathered-neuron path of
``predicted_mlp``, native kernels reading the active rows in place), each row keeping only its
own experts; else the masked dense form.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .dense import masked_predicted_mlp
from .dispatch import choose, triton_module
from .gated_mlp import _reserve, masked_mlp_gathered
from .reference import expert_mlp_reference, neuron_mask
from .spec import define_op


def _expert_mlp(x: Tensor, mask: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor], act: str,
                sparsity_hint: float) -> Tensor:
    """Gated MLP on the experts ``mask`` [..., E] selects (E divides the neurons)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m2 = mask.reshape(-1, mask.shape[-1])
    out = None
    path, _ = choose(x2, k, [w_gate.shape[0]], sparsity_hint, w_gate.element_size(), gated=True)
    if path == "triton" and b_gate is None and b_up is None and b_down is None:
        tri = triton_module("expert_mlp")
        if tri is not None and tri.supports(x2.shape[0]):
            out = tri.launch_expert_mlp(x2.contiguous(), m2.contiguous(), w_gate, w_up, w_down, act,
                                        sparsity_hint=sparsity_hint)
    elif path == "cpu":
        out = masked_mlp_gathered(x2, neuron_mask(m2, w_gate.shape[0]), w_gate, w_up, w_down, b_gate, b_up,
                                  b_down, act)
    if out is None:
        out = masked_predicted_mlp(x2, neuron_mask(m2, w_gate.shape[0]), w_gate, w_up, w_down, b_gate, b_up,
                                   b_down, act)
    return out.reshape(*lead, out.shape[-1])


def _fake(x, mask, w_gate, w_up, w_down, b_gate, b_up, b_down, act, sparsity_hint):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


def _reference(x, mask, w_gate, w_up, w_down, b_gate, b_up, b_down, act, sparsity_hint):
    return expert_mlp_reference(x, mask, w_gate, w_up, w_down, b_gate, b_up, b_down, act)


SPEC = define_op("expert_mlp", _expert_mlp, _fake, reference=_reference, input_sparse=("w_down",),
                 reserve=_reserve)
expert_mlp = SPEC.op
