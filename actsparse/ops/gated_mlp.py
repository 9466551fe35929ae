"""``actsparse::gated_mlp``: the CATS gated MLP ``down(where(|act(gate x)| > t, act(gate x) * up x, 0))``.

The gate runs in full (its output decides); where no token row needs a neuron, its up_proj row
and down_proj column are skipped. Input-sparse weights: ``w_down`` (input-major); ``w_up``
stays row-major (read output-sparse, a neuron's row contiguous).

Dispatch: the Triton kernels for few rows on CUDA where the cost model favours them (fixed
threshold; biases on any of the three, as shifted ReLU's gate has); for few rows on the CPU, up
and down on the active neurons through the native kernels, which read the active rows of
``w_up`` and of the input-major ``w_down`` in place (no gathered copy, as ``sparse_linear``
does; a gather where they cannot be built); else the masked dense form.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import cpu as native
from .dense import masked_gated_mlp
from .dispatch import choose
from .limits import CPU_GATHER_MAX_DENSITY
from .reference import activation, gated_mlp_reference, input_mask
from .sparse_linear import cpu_linear, gather_rows, reserve_sparse_gemv
from .spec import define_op


def active_neurons(mask: Tensor) -> Optional[Tensor]:
    """Indices of the neurons some row needs, or None where that union is too dense to gather."""
    active = mask.any(0)
    if int(active.sum()) > CPU_GATHER_MAX_DENSITY * mask.shape[1]:
        return None
    return active.nonzero().squeeze(1)


def up_down_gathered(x2: Tensor, idx: Tensor, on: Tensor, g: Tensor, w_up: Tensor, w_down: Tensor,
                     b_up: Optional[Tensor], b_down: Optional[Tensor]) -> Tensor:
    """Up and down on the neurons ``idx`` only; ``on`` and ``g`` are the mask and activated gate
    on those neurons ([rows, len(idx)])."""
    up = None
    if x2.dtype == w_up.dtype and w_up.is_contiguous():
        up = native.output_sparse_linear(x2, w_up, idx)  # the active rows read in place
        if up is not None and b_up is not None:
            up = up + b_up[idx]
    if up is None:
        up = F.linear(x2, w_up.index_select(0, idx), None if b_up is None else b_up[idx])
    h = torch.where(on, g * up, torch.zeros((), dtype=g.dtype))
    if h.dtype == w_down.dtype and w_down.t().is_contiguous():
        # scatter to full width and let the native kernel skip the zeros (threshold 0: a zero
        # contributes nothing), reading each active row of w_down^T once, uncopied
        full = h.new_zeros(h.shape[0], w_down.shape[1]).index_copy_(1, idx, h)
        return cpu_linear(full, w_down, b_down, 0.0, False)
    out = h @ gather_rows(w_down, idx)
    return out if b_down is None else out + b_down


def masked_mlp_gathered(x2: Tensor, mask: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                        b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor],
                        act: str) -> Optional[Tensor]:
    """A gated MLP whose neuron mask [rows, neurons] is known before the gate (predictors,
    experts): gate, up and down on the union of active neurons only; None where that union is
    too dense to gather."""
    idx = active_neurons(mask)
    if idx is None:
        return None
    g = activation(act, F.linear(x2, w_gate.index_select(0, idx), None if b_gate is None else b_gate[idx]))
    return up_down_gathered(x2, idx, mask[:, idx], g, w_up, w_down, b_up, b_down)


def contiguous_bias(b: Optional[Tensor]) -> Optional[Tensor]:
    """A bias as the Triton kernels read it (one contiguous vector), or None."""
    return None if b is None else b.contiguous()


def _gated_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Optional[Tensor],
               b_up: Optional[Tensor], b_down: Optional[Tensor], act: str, threshold: float, per_token: bool,
               sparsity_hint: float) -> Tensor:
    """CATS gated MLP: gate dense, mask ``|act(gate)| > t``, up and down only where active."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    out = None
    path, tri = choose(x2, k, [w_gate.shape[0]], sparsity_hint, w_gate.element_size(), gated=True)
    if path == "triton" and not per_token:
        out = tri.launch_gated_mlp(x2.contiguous(), w_gate, w_up, w_down, act, threshold=threshold,
                                   sparsity_hint=sparsity_hint, b_gate=contiguous_bias(b_gate),
                                   b_up=contiguous_bias(b_up), b_down=b_down)
    elif path == "cpu":
        g = activation(act, F.linear(x2, w_gate, b_gate))
        mask = input_mask(g, threshold, per_token)
        idx = active_neurons(mask)
        if idx is not None:
            out = up_down_gathered(x2, idx, mask[:, idx], g[:, idx], w_up, w_down, b_up, b_down)
    if out is None:
        out = masked_gated_mlp(x2, w_gate, w_up, w_down, b_gate, b_up, b_down, act, threshold, per_token)
    return out.reshape(*lead, out.shape[-1])


def _fake(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, threshold, per_token, sparsity_hint):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


def _reference(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, threshold, per_token, sparsity_hint):
    return gated_mlp_reference(x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, threshold, per_token)


def _reserve(args) -> None:
    w = args["w_down"]
    if isinstance(w, Tensor):
        reserve_sparse_gemv(w.device, w.shape[1], [w.shape[0]])


SPEC = define_op("gated_mlp", _gated_mlp, _fake, reference=_reference, input_sparse=("w_down",), reserve=_reserve)
gated_mlp = SPEC.op
