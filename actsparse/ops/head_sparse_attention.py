"""``actsparse::head_sparse_attention``: attention for the units a router selected, 0 elsewhere.

Takes the graph's q [B, Hq, Lq, D], the K/V cache as the model keeps it [B, Hkv, S, D] (before
any repetition to the query heads), the attention mask, and the selected units per token
(``unit_idx`` [B, Lq, n_sel], from ``actsparse::route_heads``). It computes
``sdpa(q, k, v, mask)`` for the heads of the selected units and exactly zero for the others
(``reference.head_sparse_attention_reference``).

Dispatch: decoding (Lq == 1) on CUDA where the shapes suit the Triton kernel and the cost model
says the K/V bytes it skips pay for its fixed cost: the head-sparse flash-decoding kernel,
which reads only the selected units' K/V rows. Otherwise (prefill, the CPU, short contexts):
dense scaled-dot-product attention, then the unselected heads zeroed. No weights.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cost_model import head_sparse_attention_pays
from . import dispatch
from .reference import head_sparse_attention_reference, selected_heads
from .spec import define_op


def dense_head_sparse_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], unit_idx: Tensor,
                                heads_per_unit: int, scale: float, is_causal: bool) -> Tensor:
    """Dense attention over every head, unselected heads zeroed. Grouped-query attention reads
    the cache as it is (``enable_gqa``): no copy of K/V repeated to the query heads."""
    B, Hq, Lq, _ = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
                                         scale=scale, enable_gqa=Hq != k.shape[1])
    idx = unit_idx if unit_idx.dim() == 3 else unit_idx[:, None, :]
    keep = selected_heads(idx, B, Lq, Hq, heads_per_unit)[..., None]
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device)).contiguous()


def _head_sparse_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], unit_idx: Tensor,
                           heads_per_unit: int, scale: float, is_causal: bool, density: float) -> Tensor:
    """Selected-unit attention; ``density`` (kept units / units) informs the dispatch only."""
    path = dispatch._FORCED  # tests force each branch (dispatch.forced)
    if q.shape[2] == 1 and path in (None, "triton"):
        ha = dispatch.triton_module("head_attention")
        if ha is not None and ha.supports(q, k, v, attn_mask, heads_per_unit):
            pays = q.is_cuda and head_sparse_attention_pays(q.shape[0], k.shape[1], k.shape[2], k.shape[3],
                                                            density, k.element_size())
            if pays or path == "triton":
                return ha.launch_head_sparse_decode(q, k, v, attn_mask, unit_idx, heads_per_unit, scale)
    return dense_head_sparse_attention(q, k, v, attn_mask, unit_idx, heads_per_unit, scale, is_causal)


def _fake(q, k, v, attn_mask, unit_idx, heads_per_unit, scale, is_causal, density):
    return q.new_empty(*q.shape[:3], v.shape[3])


def _reference(q, k, v, attn_mask, unit_idx, heads_per_unit, scale, is_causal, density):
    return head_sparse_attention_reference(q, k, v, attn_mask, unit_idx, heads_per_unit, scale, is_causal)


SPEC = define_op("head_sparse_attention", _head_sparse_attention, _fake, reference=_reference)
head_sparse_attention = SPEC.op
