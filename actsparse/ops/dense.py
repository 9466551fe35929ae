"""The masked dense forms of the ops: the mask applied, then ordinary matmuls.

The passes emit these (as plain torch calls that Inductor traces and fuses: the mask joins the
kernel that produces the input, the matmul runs as in the dense model) where the sparse path
cannot pay for the traced rows, and the ops run them for many rows at run time. They compute
the reference function, with matmuls in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import activation, input_mask, selected_heads


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def masked_input(x: Tensor, threshold: float | Tensor, per_token: bool = False) -> Tensor:
    """``x`` where ``|x| > t`` (per_token: ``t * mean|row|``; t may be per channel), else 0."""
    return torch.where(input_mask(x, threshold, per_token), x, _zero(x))


def masked_linears(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                   thresholds: Sequence[float | Tensor], per_token: bool = False) -> list[Tensor]:
    """``linear(masked_input(x, t_i), W_i, b_i)`` for each output (one masked copy per threshold)."""
    copies: dict[int, Tensor] = {}
    outs = []
    for w, b, t in zip(weights, biases, thresholds):
        key = id(t) if isinstance(t, Tensor) else hash(float(t))
        if key not in copies:
            copies[key] = masked_input(x, t, per_token)
        outs.append(F.linear(copies[key], w, b))
    return outs


def masked_gated_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
                     b_up: Tensor | None, b_down: Tensor | None, act: str, threshold: float,
                     per_token: bool = False) -> Tensor:
    """CATS: ``down(where(|act(gate x)| > t, act(gate x) * up x, 0))``; activation and mask in fp32."""
    g = activation(act, F.linear(x, w_gate, b_gate).float())
    h = torch.where(input_mask(g, threshold, per_token), g * F.linear(x, w_up, b_up).float(),
                    torch.zeros((), device=x.device))
    return F.linear(h.to(x.dtype), w_down, b_down)


def masked_predicted_mlp(x: Tensor, mask: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                         b_gate: Tensor | None, b_up: Tensor | None, b_down: Tensor | None, act: str) -> Tensor:
    """``down(where(mask, act(gate x) * up x, 0))``; activation in fp32."""
    g = activation(act, F.linear(x, w_gate, b_gate).float())
    h = torch.where(mask, g * F.linear(x, w_up, b_up).float(), torch.zeros((), device=x.device))
    return F.linear(h.to(x.dtype), w_down, b_down)


def zero_unselected_heads(out: Tensor, unit_idx: Tensor, heads_per_unit: int) -> Tensor:
    """An attention output [B, Hq, Tq, D] with the heads of unselected units zeroed (eager
    attention implementations get head routing this way: its semantics, at dense speed)."""
    B, Hq, Tq, _ = out.shape
    keep = selected_heads(unit_idx.reshape(B, Tq, -1), B, Tq, Hq, heads_per_unit)[..., None]
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
