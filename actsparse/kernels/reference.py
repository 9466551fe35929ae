"""Pure-torch reference semantics of every actsparse op.

These functions define what the compiled model must compute; the fast paths (CPU gather,
Triton kernels, the weight cache) are tested against them. They favour clarity over speed:
masks are applied and the dense matmul runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activation functions the gated-MLP pattern recognises, by name."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")


def row_scale(x2d: torch.Tensor) -> torch.Tensor:
    """Per-token mean |x| in fp32: the scale of per-token (statistical top-k) cutoffs."""
    return x2d.float().abs().mean(dim=-1)


def input_mask(x2d: torch.Tensor, threshold: float, per_token: bool) -> torch.Tensor:
    """TEAL mask ``|x| > t``, compared in fp32; with ``per_token`` the cutoff is ``t * mean|row|``.

    Comparing in fp32 (not in the input's dtype) keeps every implementation, including the
    Triton kernels that load bf16 and compare in fp32, bit-for-bit on the same mask.
    """
    mag = x2d.abs().float()
    if per_token:
        return mag > threshold * row_scale(x2d).unsqueeze(-1)
    return mag > threshold


def wina_cutoffs(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-input-channel cutoffs ``t / ||W[:, i]||`` of a WINA rule, for an nn.Linear weight.

    Computed in float64 and rounded once to fp32, so the result does not depend on the weight's
    memory layout (a reduction's rounding does); a zero column never activates (cutoff inf).
    """
    norms = weight.detach().double().norm(dim=0)
    tau = torch.where(norms > 0, threshold / norms.clamp_min(1e-300), torch.full_like(norms, float("inf")))
    return tau.float()


def sparse_linear_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    thresholds: Sequence[float],
    per_token: bool = False,
) -> list[torch.Tensor]:
    """Each output i is ``linear(x * (|x| > t_i), W_i, b_i)``, computed in fp32."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    outs = []
    for w, b, t in zip(weights, biases, thresholds):
        xm = torch.where(input_mask(x2, t, per_token), x2, torch.zeros((), dtype=x2.dtype))
        y = F.linear(xm.float(), w.float(), None if b is None else b.float())
        outs.append(y.to(x.dtype).reshape(*lead, w.shape[0]))
    return outs


def gated_mlp_reference(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    act: str,
    threshold: float,
    per_token: bool = False,
) -> torch.Tensor:
    """CATS: ``down(where(|act(gate x)| > t, act(gate x) * up x, 0))`` in fp32."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    g = activation(act, F.linear(x2, w_gate.float(), f32(b_gate)))
    mask = input_mask(g, threshold, per_token)
    h = torch.where(mask, g * F.linear(x2, w_up.float(), f32(b_up)), torch.zeros(()))
    out = F.linear(h, w_down.float(), f32(b_down))
    return out.to(x.dtype).reshape(*lead, w_down.shape[0])
