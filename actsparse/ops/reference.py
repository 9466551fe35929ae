"""Pure-torch reference semantics of every actsparse op: the one place they are defined.

These functions say what the compiled model must compute; every fast path (the CPU native
kernel and gather path, the Triton kernels, the weight cache, the masked dense forms) is
tested against them. They favour clarity over speed: masks are compared in fp32, matmuls run
in fp32 and the result is cast back to the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

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
    return wina_cutoffs_from_norms(weight.detach().double().norm(dim=0), threshold)


def wina_cutoffs_from_norms(norms: Tensor, threshold: float) -> Tensor:
    """``t / norms`` as ``wina_cutoffs`` rounds it, from float64 column norms computed elsewhere
    (a column-parallel shard's norms are summed over the ranks)."""
    norms = norms.double()
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


def gated_product_reference(x: Tensor, weights: Sequence[Tensor], thresholds: Sequence[float], act: str,
                            per_token: bool = False) -> Tensor:
    """A gated MLP's down input ``act(gate x_g) * up x_u`` with input masks ``x_g, x_u`` (each
    ``x * (|x| > t)``), in fp32 and rounded once to x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    g, u = (_masked_linear(x2, w, None, input_mask(x2, t, per_token)) for w, t in zip(weights, thresholds))
    return (activation(act, g) * u).to(x.dtype).reshape(*lead, weights[0].shape[0])


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


# ------------------------------------------------------------------------ head-sparse attention

def attended_positions(attn_mask: Optional[torch.Tensor], shape: tuple, device=None) -> torch.Tensor:
    """Bool [B, Hq, Lq, S]: True where a position takes part in the softmax."""
    if attn_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if attn_mask.dtype == torch.bool:
        return attn_mask.expand(shape)
    return (attn_mask.float() > torch.finfo(attn_mask.dtype).min).expand(shape)


def selected_heads(unit_idx: torch.Tensor, batch: int, lq: int, num_heads: int, heads_per_unit: int) -> torch.Tensor:
    """Bool [B, Hq, Lq]: True for the query heads of the selected units of each token."""
    num_units = num_heads // heads_per_unit
    idx = unit_idx.to(torch.int64)
    if idx.dim() == 2:  # [B, n_sel]: one selection per sequence (Lq must be 1)
        assert lq == 1, "unit_idx [B, n_sel] needs Lq == 1; pass [B, Lq, n_sel] otherwise"
        idx = idx[:, None, :]
    assert idx.shape[:2] == (batch, lq), f"unit_idx must be [B, Lq, n_sel], got {tuple(unit_idx.shape)}"
    units = torch.zeros(batch, lq, num_units, dtype=torch.bool, device=idx.device)
    units.scatter_(2, idx, True)
    heads = units.repeat_interleave(heads_per_unit, dim=2)  # [B, Lq, Hq]
    return heads.permute(0, 2, 1)


def head_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    unit_idx: torch.Tensor,
    heads_per_unit: int,
    scale: float,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for the heads of the selected units, 0 elsewhere.

    q [B, Hq, Lq, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], Hq = Hkv * G. attn_mask: None, bool
    (True = attend) or additive float, broadcastable to [B, Hq, Lq, S]. unit_idx: integers
    [B, n_sel] (Lq == 1) or [B, Lq, n_sel], units in [0, Hq / heads_per_unit). fp32 math,
    output [B, Hq, Lq, Dv] in q's dtype.

    A unit is ``heads_per_unit`` consecutive query heads (a whole KV group when it is the group
    size, a single head when it is 1). Masked-out positions: False in a bool mask; a value at or
    below ``finfo(dtype).min`` in a float mask (-inf too). A row with no attended position gives
    0 (where plain softmax would average V uniformly, or give NaN for -inf).
    """
    B, Hq, Lq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0, "query heads must be a multiple of KV heads"
    G = Hq // Hkv
    assert Hq % heads_per_unit == 0 and (G % heads_per_unit == 0 or heads_per_unit % G == 0)
    kf = k.float().repeat_interleave(G, dim=1)  # [B, Hq, S, D]
    vf = v.float().repeat_interleave(G, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale  # [B, Hq, Lq, S]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.float()
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(Lq, S, dtype=torch.bool, device=q.device).tril()
    attended = attended_positions(attn_mask, (B, Hq, Lq, S), q.device)
    scores = scores.masked_fill(~attended, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(attended.any(dim=-1, keepdim=True), probs, torch.zeros((), device=q.device))
    out = probs @ vf  # [B, Hq, Lq, Dv]
    keep = selected_heads(unit_idx, B, Lq, Hq, heads_per_unit).to(q.device)[..., None]
    out = torch.where(keep, out, torch.zeros((), device=q.device))
    return out.to(q.dtype)


def route_heads_reference(x: Tensor, w: Tensor, b: Tensor, keep: int) -> Tensor:
    """The ``keep`` units a linear router scores highest, per token: int64 [..., keep]."""
    logits = F.linear(x.float(), w.float(), b.float())
    return torch.topk(logits, keep, dim=-1, sorted=False).indices


def quant_sparse_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None,
                                  bias: Tensor | None, threshold: float, per_token: bool, bits: int,
                                  group_size: int, scale: Tensor | None = None) -> Tensor:
    """``linear(x * (|x| > t), dequantize(W), b)`` over a quantized input-major weight
    (``actsparse.quant.storage``): dequantised, masked and multiplied in fp32."""
    from ..quant.storage import dequantize_input_major

    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    w = dequantize_input_major(qweight, scales, offsets, bits, group_size)  # [K, N]
    xm = torch.where(input_mask(x2, threshold, per_token, scale), x2, torch.zeros((), dtype=x2.dtype, device=x2.device))
    y = xm.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, w.shape[1])


def lowrank_complement_reference(x: Tensor, a: Tensor, b: Tensor, threshold: float) -> Tensor:
    """``A (B (x * (|x| <= t)))``: the low-rank part of a sparse + low-rank (R-Sparse) linear."""
    xc = torch.where(x.abs().float() > threshold, torch.zeros((), dtype=x.dtype, device=x.device), x)
    return F.linear(F.linear(xc.float(), b.float()), a.float()).to(x.dtype)


def rsparse_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, threshold: float,
                             a: Tensor | None, b: Tensor | None) -> Tensor:
    """``W (x * m) + A (B (x * (1 - m))) + bias`` with ``m = |x| > t`` (no low-rank part without A, B)."""
    y = sparse_linear_reference(x, [weight], [bias], [threshold], False)[0]
    return y if a is None else y + lowrank_complement_reference(x, a, b, threshold)


# ------------------------------------------------------------------------ experts (dense-to-MoE)

def expert_scores(x: Tensor, router: Sequence[Tensor]) -> Tensor:
    """A router's predicted output norm of each expert, in fp32 [..., E].

    ``router`` is ``(w, b)`` for a linear router ``x W^T + b`` or ``(w1, b1, w2, b2)`` for a
    two-layer one ``relu(x W1^T + b1) W2^T + b2``.
    """
    if len(router) not in (2, 4):
        raise ValueError(f"a router is (w, b) or (w1, b1, w2, b2), got {len(router)} tensors")
    s = F.linear(x.float(), router[0].float(), router[1].float())
    if len(router) == 4:
        s = F.linear(torch.relu(s), router[2].float(), router[3].float())
    return s


def expert_mask(x: Tensor, router: Sequence[Tensor], threshold: float) -> Tensor:
    """Dynamic-k selection: the experts whose predicted norm exceeds ``threshold``, bool [..., E]."""
    return expert_scores(x, router) > threshold


def neuron_mask(mask: Tensor, neurons: int) -> Tensor:
    """An expert mask [..., E] widened to its neurons [..., neurons]: expert e owns the
    contiguous block ``[e * neurons / E, (e + 1) * neurons / E)``."""
    e = mask.shape[-1]
    if neurons % e:
        raise ValueError(f"{neurons} neurons do not split into {e} equal experts")
    return mask.repeat_interleave(neurons // e, dim=-1)


def expert_mlp_reference(x: Tensor, mask: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                         b_gate: Tensor | None, b_up: Tensor | None, b_down: Tensor | None, act: str) -> Tensor:
    """The gated MLP on the selected experts' neurons only (contiguous blocks), in fp32."""
    return predicted_mlp_reference(x, neuron_mask(mask, w_gate.shape[0]), w_gate, w_up, w_down,
                                   b_gate, b_up, b_down, act)
