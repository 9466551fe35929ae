"""Pure-torch reference semantics of every actsparse op: the one place they are defined.

These functions say what the compiled model must compute; every fast path (the CPU native
kernel and gather path, the Triton kernels, the weight cache, the masked dense forms) is
tested against them. They favour clarity over speed: masks are compared in fp32, matmuls run
in fp32 and the result is cast back to the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation(name: str, x: Tensor) -> Tensor:
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


def row_scale(x2d: Tensor) -> Tensor:
    """Per-token mean |x| in fp32: the scale of per-token (statistical top-k) cutoffs."""
    return x2d.float().abs().mean(dim=-1)


def input_mask(x2d: Tensor, threshold: float | Tensor, per_token: bool = False,
               scale: Tensor | None = None) -> Tensor:
    """TEAL mask ``|x| > t``, compared in fp32; ``per_token``: the cutoff is ``t * mean|row|``.

    ``threshold`` is a float or a vector of per-channel cutoffs (WINA). ``scale`` gives the
    per-row factor explicitly (the kernels take it as an argument; ``per_token`` computes it).
    Comparing in fp32 (not in the input's dtype) keeps every implementation, including the
    Triton kernels that load bf16 and compare in fp32, on the same mask bit for bit.
    """
    mag = x2d.abs().float()
    cutoff = threshold.float().to(x2d.device) if isinstance(threshold, Tensor) else threshold
    if scale is None and per_token:
        scale = row_scale(x2d)
    if scale is not None:
        return mag > scale.float().reshape(*x2d.shape[:-1], 1) * cutoff
    return mag > cutoff


def wina_cutoffs(weight: Tensor, threshold: float) -> Tensor:
    """Per-input-channel cutoffs ``t / ||W[:, i]||`` of a WINA rule, for an nn.Linear weight.

    Computed in float64 and rounded once to fp32, so the result does not depend on the weight's
    memory layout (a reduction's rounding does); a zero column never activates (cutoff inf).
    """
    norms = weight.detach().double().norm(dim=0)
    tau = torch.where(norms > 0, threshold / norms.clamp_min(1e-300), torch.full_like(norms, float("inf")))
    return tau.float()


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _masked_linear(x2: Tensor, w: Tensor, b: Tensor | None, mask: Tensor) -> Tensor:
    xm = torch.where(mask, x2, torch.zeros((), dtype=x2.dtype, device=x2.device))
    return F.linear(xm.float(), w.float(), _f32(b))


def sparse_linear_reference(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                            thresholds: Sequence[float | Tensor], per_token: bool = False,
                            scale: Tensor | None = None) -> list[Tensor]:
    """Each output i is ``linear(x * (|x| > t_i), W_i, b_i)``, computed in fp32.

    A threshold may be a per-channel cutoff vector (WINA, ``channel_sparse_linear``); ``scale``
    (one factor per token row) multiplies every cutoff, as ``per_token`` does with mean|x|.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    return [_masked_linear(x2, w, b, input_mask(x2, t, per_token, scale)).to(x.dtype).reshape(*lead, w.shape[0])
            for w, b, t in zip(weights, biases, thresholds)]


def gated_mlp_reference(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
                        b_up: Tensor | None, b_down: Tensor | None, act: str, threshold: float,
                        per_token: bool = False) -> Tensor:
    """CATS: ``down(where(|act(gate x)| > t, act(gate x) * up x, 0))`` in fp32."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    g = activation(act, F.linear(x2, w_gate.float(), _f32(b_gate)))
    h = torch.where(input_mask(g, threshold, per_token), g * F.linear(x2, w_up.float(), _f32(b_up)),
                    torch.zeros((), device=x.device))
    return F.linear(h, w_down.float(), _f32(b_down)).to(x.dtype).reshape(*lead, w_down.shape[0])


def predictor_logits(x: Tensor, w1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """A low-rank predictor's logits, one per neuron: ``(x W1^T) W2^T + b2``."""
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
    """A learned predictor and its selection: the neurons it keeps, [..., n] bool."""
    return select(predictor_logits(x, w1, w2, b2), keep, threshold, topk)


def predicted_mlp_reference(x: Tensor, mask: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                            b_gate: Tensor | None, b_up: Tensor | None, b_down: Tensor | None,
                            act: str) -> Tensor:
    """``down(where(mask, act(gate x) * up x, 0))`` in fp32, cast to x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).float()
    m2 = mask.reshape(-1, mask.shape[-1])
    g = activation(act, F.linear(x2, w_gate.float(), _f32(b_gate)))
    h = torch.where(m2, g * F.linear(x2, w_up.float(), _f32(b_up)), torch.zeros((), device=x.device))
    return F.linear(h, w_down.float(), _f32(b_down)).to(x.dtype).reshape(*lead, w_down.shape[0])


def cached_sparse_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """The cached-weight index op computes the masked linear: the cache changes only the speed."""
    return sparse_linear_reference(x, [weight], [bias], [threshold])[0]
