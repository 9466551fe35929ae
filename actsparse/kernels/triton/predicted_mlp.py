"""Predicted-sparse gated MLP in Triton: out = (mask * act(x Wg^T) * (x Wu^T)) Wd^T.

Why it is fast
--------------
The mask comes from a learned predictor, before the MLP runs, so unlike CATS the gate
projection is not needed to decide: where no token of the batch wants neuron f, neither its
gate row, its up row nor its down column is read.

Two launches:

1. `_pred_gate_up_kernel`, one program per block of BLOCK_F neurons: loads the block's mask
   (a [M, BLOCK_F] tile), and runs the gate and up GEMVs in one loop over K with each weight
   row's loads predicated on "some batch row needs this neuron" (a block with none is skipped
   entirely). Row-major w_gate / w_up keep a neuron's K weights contiguous, so a skipped neuron
   skips two contiguous rows. It writes h = mask * act(g) * u in fp32.
2. down_proj is an input-sparse linear on h with threshold 0 (exactly the zeros of h), the
   compacting split-K kernel of `sparse_gemv` over input-major w_down, as in the CATS kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from actsparse.kernels.triton import _runtime as rt
from actsparse.kernels.triton.gated_mlp import ACTIVATIONS, _activation
from actsparse.kernels.triton.sparse_gemv import launch_sparse_linear


@triton.jit
def _pred_gate_up_kernel(
    X, MASK, WG, WU, H,
    stride_xm, stride_xk, stride_mm, s_gf, s_gk, s_uf, s_uk,
    M, K, F,
    M_BUCKET, SPARSITY_KEY, DEVICE_KEY,  # only for the autotune key
    ACT: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    tile_ok = m_ok[:, None] & f_ok[None, :]
    on = tl.load(MASK + offs_m[:, None] * stride_mm + offs_f[None, :], mask=tile_ok, other=0) != 0
    row_on = tl.max(on.to(tl.int32), axis=0) > 0  # neurons some batch row needs
    h = tl.zeros([M_PAD, BLOCK_F], dtype=tl.float32)
    if tl.max(row_on.to(tl.int32), axis=0) > 0:
        if M_PAD == 1:
            acc_g = tl.zeros([BLOCK_F, BLOCK_K], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_F, BLOCK_K], dtype=tl.float32)
        else:
            acc_g = tl.zeros([M_PAD, BLOCK_F], dtype=tl.float32)
            acc_u = tl.zeros([M_PAD, BLOCK_F], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xt = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [M_PAD, BLOCK_K]
            w_on = row_on[:, None] & k_ok[None, :]
            wg = tl.load(WG + offs_f[:, None] * s_gf + offs_k[None, :] * s_gk, mask=w_on, other=0.0)
            wu = tl.load(WU + offs_f[:, None] * s_uf + offs_k[None, :] * s_uk, mask=w_on, other=0.0)
            if M_PAD == 1:
                xv = tl.sum(xt.to(tl.float32), axis=0)[None, :]
                acc_g += wg.to(tl.float32) * xv
                acc_u += wu.to(tl.float32) * xv
            elif DOT_PRECISION == "upcast":  # the CPU interpreter gets bf16 dots wrong
                xf = xt.to(tl.float32)
                acc_g = tl.dot(xf, tl.trans(wg.to(tl.float32)), acc_g, input_precision="ieee")
                acc_u = tl.dot(xf, tl.trans(wu.to(tl.float32)), acc_u, input_precision="ieee")
            else:
                xw = xt.to(wg.dtype)
                acc_g = tl.dot(xw, tl.trans(wg), acc_g, input_precision=DOT_PRECISION)
                acc_u = tl.dot(xw, tl.trans(wu), acc_u, input_precision=DOT_PRECISION)
        if M_PAD == 1:
            g = tl.sum(acc_g, axis=1)[None, :]
            u = tl.sum(acc_u, axis=1)[None, :]
        else:
            g = acc_g
            u = acc_u
        h = tl.where(on, _activation(g, ACT) * u, 0.0)
    tl.store(H + offs_m[:, None] * F + offs_f[None, :], h, mask=tile_ok)


def _cfg(block_f, block_k, warps, stages=1):
    return triton.Config(dict(BLOCK_F=block_f, BLOCK_K=block_k), num_warps=warps, num_stages=stages)


CONFIGS_M1 = [_cfg(8, 256, 4), _cfg(16, 256, 4), _cfg(32, 128, 4), _cfg(16, 512, 8), _cfg(8, 512, 4),
              _cfg(4, 1024, 4)]
CONFIGS_DOT = [_cfg(32, 64, 4, 3), _cfg(64, 64, 4, 3), _cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3)]
INTERPRET_CONFIG = dict(BLOCK_F=32, BLOCK_K=32, num_warps=4)

_TUNERS: dict[int, object] = {}


def _tuned_kernel(m_pad: int):
    if m_pad not in _TUNERS:
        configs = CONFIGS_M1 if m_pad == 1 else CONFIGS_DOT
        key = ["K", "F", "M_BUCKET", "SPARSITY_KEY", "DEVICE_KEY", "ACT"]
        _TUNERS[m_pad] = rt.autotune(configs, key)(_pred_gate_up_kernel)
    return _TUNERS[m_pad]


def launch_pred_gate_up(x, mask, w_gate, w_up, act, sparsity_hint=None, config=None) -> torch.Tensor:
    """h = mask * act(x Wg^T) * (x Wu^T) in fp32, [M, F]; masked-off neurons read no weights."""
    assert act in ACTIVATIONS, f"act must be one of {ACTIVATIONS}, got {act!r}"
    M, K = x.shape
    Fn = w_gate.shape[0]
    assert w_gate.shape == (Fn, K) and w_up.shape == (Fn, K) and w_up.dtype == w_gate.dtype
    assert mask.shape == (M, Fn) and mask.stride(1) == 1
    assert 1 <= M <= rt.MAX_ROWS
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton loads uint8 without a bool detour
    h = torch.empty((M, Fn), dtype=torch.float32, device=x.device)
    m_pad = 1 if M == 1 else 16
    args = [x, mask, w_gate, w_up, h, x.stride(0), x.stride(1), mask.stride(0),
            w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1), M, K, Fn,
            rt.batch_bucket(M), rt.sparsity_bucket(sparsity_hint), rt.device_key(x.device)]
    meta = dict(ACT=act, M_PAD=m_pad, DOT_PRECISION=rt.dot_precision(w_gate.dtype))
    grid = lambda meta_: (triton.cdiv(Fn, meta_["BLOCK_F"]),)  # noqa: E731
    if config is None and rt.interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        _pred_gate_up_kernel[grid(config)](*args, **meta, **config)
    else:
        _tuned_kernel(m_pad)[grid](*args, **meta)
    return h


def launch_predicted_mlp(x, mask, w_gate, w_up, w_down, act, sparsity_hint=None,
                         gate_config=None, down_config=None) -> torch.Tensor:
    """Always the Triton kernels: masked gate/up, then the sparse down projection on h."""
    assert w_down.shape[1] == w_gate.shape[0]
    h = launch_pred_gate_up(x, mask, w_gate, w_up, act, sparsity_hint, gate_config)
    (out,) = launch_sparse_linear(h, [w_down], [None], [0.0], None, sparsity_hint,
                                  out_dtype=x.dtype, config=down_config)
    return out


def dense_predicted_mlp(x, mask, w_gate, w_up, w_down, act) -> torch.Tensor:
    """Dense fallback (prefill, or batches whose union is dense): cuBLAS on the same storage."""
    g = _act_torch(F.linear(x, w_gate).to(torch.float32), act)
    h = torch.where(mask, g * F.linear(x, w_up).to(torch.float32), torch.zeros((), device=x.device))
    return F.linear(h.to(x.dtype), w_down)


def predicted_mlp(x, mask, w_gate, w_up, w_down, act, sparsity_hint=None) -> torch.Tensor:
    """The sparse kernels where the batch path is on and the cost model favours them, else dense."""
    from actsparse.kernels import cost_model
    from actsparse.kernels.triton import _kernel_ok, sparse_gemv

    m = x.shape[0] if x.dim() == 2 else 0
    if _kernel_ok(x) and sparse_gemv.batch_path_enabled(m):
        # the CATS model reads the gate in full; here it is skipped too, so sparse pays at least as well
        dense_better = sparsity_hint is not None and cost_model.gated_mlp_predict(
            m, x.shape[1], w_gate.shape[0], float(sparsity_hint), w_gate.element_size())["speedup"] <= 1.0
        if not dense_better:
            return launch_predicted_mlp(x, mask, w_gate, w_up, w_down, act, sparsity_hint)
    return dense_predicted_mlp(x, mask, w_gate, w_up, w_down, act)


def _act_torch(g: torch.Tensor, act: str) -> torch.Tensor:
    from actsparse.kernels.reference import activation

    return activation(act, g)


def predicted_mlp_triton_reference(x, mask, w_gate, w_up, w_down, act) -> torch.Tensor:
    """Pure-torch reference: everything in fp32, cast to x's dtype at the end."""
    xf = x.to(torch.float32)
    g = _act_torch(xf @ w_gate.to(torch.float32).t(), act)
    h = torch.where(mask, g * (xf @ w_up.to(torch.float32).t()), torch.zeros((), device=x.device))
    return (h @ w_down.to(torch.float32).t()).to(x.dtype)


__all__ = ["launch_predicted_mlp", "launch_pred_gate_up", "predicted_mlp", "dense_predicted_mlp",
           "predicted_mlp_triton_reference"]
