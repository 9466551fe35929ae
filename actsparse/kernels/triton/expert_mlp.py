"""Block-sparse gated MLP over contiguous experts in Triton (dense-to-MoE models).

Why it is fast
--------------
After ``actsparse.moefy`` expert e owns the neurons ``[e * BS, (e + 1) * BS)``: BS contiguous
rows of gate and up (row-major) and BS contiguous rows of the input-major down weight. An
expert that no token row of the batch selected is never read; one that some row selected is
read whole, in long contiguous runs (no per-neuron compaction, no index lists).

Masks: each row keeps its own experts (``h`` is zero outside them), while the weights read are
the union of the rows' experts: a selected block is loaded once for the whole batch.

Two launches:

1. ``_expert_gate_up_kernel``, one program per BLOCK_F neurons: the expert of each neuron is
   ``f // BS``; a block no row needs skips its loops; else gate and up GEMVs over K, the
   activation in fp32, ``h = on * act(g) * u`` in fp32 (no rounding before down).
2. ``_expert_down_kernel``, one program per (output tile, expert): a selected expert's BS rows
   of the input-major down weight times its slice of h, accumulated in fp32 and added
   atomically into an fp32 output (split over experts: every SM has work at batch 1).
"""

from __future__ import annotations

from typing import Optional

import torch

import triton
import triton.language as tl

from actsparse.kernels.triton import _runtime as rt
from actsparse.kernels.triton.gated_mlp import ACTIVATIONS, _activation, _rows_matmul
from actsparse.kernels.triton.sparse_gemv import rows_pad


@triton.jit
def _expert_gate_up_kernel(
    X, MASK, WG, WU, H,
    stride_xm, stride_xk, stride_mm, s_gf, s_gk, s_uf, s_uk,
    M, K, F, BS,
    ACT: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    tile_ok = m_ok[:, None] & f_ok[None, :]
    expert = offs_f // BS
    on = (tl.load(MASK + offs_m[:, None] * stride_mm + expert[None, :], mask=tile_ok, other=0) != 0) & tile_ok
    row_on = tl.max(on.to(tl.int32), axis=0) > 0  # neurons of experts some row selected
    h = tl.zeros([M_PAD, BLOCK_F], dtype=tl.float32)
    if tl.max(row_on.to(tl.int32), axis=0) > 0:
        g = _activation(_rows_matmul(X, stride_xm, stride_xk, WG, s_gf, s_gk, offs_f, row_on, offs_m, m_ok, K,
                                     M_PAD, BLOCK_F, BLOCK_K, DOT_PRECISION), ACT)
        u = _rows_matmul(X, stride_xm, stride_xk, WU, s_uf, s_uk, offs_f, row_on, offs_m, m_ok, K,
                         M_PAD, BLOCK_F, BLOCK_K, DOT_PRECISION)
        h = tl.where(on, g * u, 0.0)
    tl.store(H + offs_m[:, None] * F + offs_f[None, :], h, mask=tile_ok)


@triton.jit
def _expert_down_kernel(
    H, MASK, WD, OUT,
    stride_mm, s_wf, s_wn,
    M, N, F, BS,
    M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    e = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    sel = (tl.load(MASK + offs_m * stride_mm + e, mask=m_ok, other=0) != 0) & m_ok
    if tl.max(sel.to(tl.int32), axis=0) > 0:  # an expert no row selected is never read
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if M_PAD == 1:
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        for k in range(0, BS, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_ok = offs_k < BS
            rows = e * BS + offs_k
            h = tl.load(H + offs_m[:, None] * F + rows[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(WD + rows[:, None] * s_wf + offs_n[None, :] * s_wn, mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)  # [BLOCK_K, BLOCK_N]: contiguous rows of the input-major weight
            if M_PAD == 1:
                acc += tl.sum(h, axis=0)[:, None] * w.to(tl.float32)
            elif DOT_PRECISION == "upcast":
                acc = tl.dot(h, w.to(tl.float32), acc, input_precision="ieee")
            elif DOT_PRECISION == "ieee":
                acc = tl.dot(h, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        if M_PAD == 1:
            out = tl.sum(acc, axis=0)[None, :]
        else:
            out = acc
        tl.atomic_add(OUT + offs_m[:, None] * N + offs_n[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


#: Block sizes. Measured nowhere yet (the GPU benchmark is benchmarks/kernels_experts.py); the
#: interpreter uses small ones so the tests stay fast.
GATE_CONFIG_M1 = dict(BLOCK_F=16, BLOCK_K=256, num_warps=4)
GATE_CONFIG_DOT = dict(BLOCK_F=32, BLOCK_K=64, num_warps=4)
DOWN_CONFIG_M1 = dict(BLOCK_N=128, BLOCK_K=32, num_warps=4)
DOWN_CONFIG_DOT = dict(BLOCK_N=64, BLOCK_K=32, num_warps=4)
INTERPRET_GATE = dict(BLOCK_F=16, BLOCK_K=32, num_warps=4)
INTERPRET_DOWN = dict(BLOCK_N=32, BLOCK_K=16, num_warps=4)


def supports(m: int) -> bool:
    """Whether the kernels take ``m`` token rows."""
    return 1 <= m <= rt.MAX_ROWS


def launch_expert_mlp(x: torch.Tensor, mask: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                      w_down: torch.Tensor, act: str, sparsity_hint: Optional[float] = None,
                      gate_config: Optional[dict] = None, down_config: Optional[dict] = None) -> torch.Tensor:
    """``down(where(on, act(x Wg^T) * (x Wu^T), 0))`` on the experts ``mask`` [M, E] selects.

    ``w_down`` is [N, F] in any layout (input-major, i.e. ``w_down.t()`` contiguous, reads
    each expert's rows contiguously). Returns [M, N] in x's dtype.
    """
    assert act in ACTIVATIONS, f"act must be one of {ACTIVATIONS}, got {act!r}"
    M, K = x.shape
    Fn = w_gate.shape[0]
    E = mask.shape[1]
    N = w_down.shape[0]
    assert Fn % E == 0, f"{Fn} neurons do not split into {E} experts"
    assert w_gate.shape == (Fn, K) and w_up.shape == (Fn, K) and w_down.shape[1] == Fn
    assert mask.shape[0] == M and mask.stride(1) == 1 and supports(M)
    bs = Fn // E
    mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    m_pad = rows_pad(M)
    prec = rt.dot_precision(w_gate.dtype)
    interp = rt.interpreting()
    gcfg = gate_config or (INTERPRET_GATE if interp else GATE_CONFIG_M1 if m_pad == 1 else GATE_CONFIG_DOT)
    dcfg = down_config or (INTERPRET_DOWN if interp else DOWN_CONFIG_M1 if m_pad == 1 else DOWN_CONFIG_DOT)
    h = torch.empty((M, Fn), dtype=torch.float32, device=x.device)
    _expert_gate_up_kernel[(triton.cdiv(Fn, gcfg["BLOCK_F"]),)](
        x, mask_arg, w_gate, w_up, h, x.stride(0), x.stride(1), mask_arg.stride(0),
        w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1), M, K, Fn, bs,
        ACT=act, M_PAD=m_pad, DOT_PRECISION=prec, **gcfg)
    out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    _expert_down_kernel[(triton.cdiv(N, dcfg["BLOCK_N"]), E)](
        h, mask_arg, w_down, out, mask_arg.stride(0), w_down.stride(1), w_down.stride(0), M, N, Fn, bs,
        M_PAD=m_pad, DOT_PRECISION=prec, **dcfg)
    return out.to(x.dtype)


__all__ = ["launch_expert_mlp", "supports"]
