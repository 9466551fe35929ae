"""CATS gated MLP in Triton: out = (mask * act(x Wg^T) * (x Wu^T)) Wd^T, mask = |act(x Wg^T)| > t.

Why it is fast
--------------
The gate is computed densely, but it decides which of the F neurons matter: where
|act(gate)| <= t the neuron's up_proj row and down_proj column are never read.

Two launches:

1. `_gate_up_kernel`, one program per block of BLOCK_F neurons: the dense gate GEMV over the
   whole of K (w_gate rows, row-major), the activation and the threshold in fp32, then the
   up GEMV over the same K with each w_up row's loads predicated on "some batch row needs this
   neuron". Row-major w_up keeps a neuron's K weights contiguous, so a skipped neuron skips one
   contiguous row. It writes h = mask * g * u in fp32 (no rounding before down).
2. down_proj is an input-sparse linear on h with threshold 0 (exactly the zeros of h), so it
   reuses `sparse_gemv`'s compacting split-K kernel over input-major w_down: a skipped neuron
   skips one contiguous row of w_down^T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from actsparse.kernels.triton import _runtime as rt
from actsparse.kernels.triton.sparse_gemv import launch_sparse_linear

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """fp32 activations; tanh written through the sigmoid (0.5 * (1 + tanh(y)) = sigmoid(2y))."""
    if ACT == "silu":
        a = g * tl.sigmoid(g)
    elif ACT == "gelu":
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    else:
        a = tl.maximum(g, 0.0)
    return a


@triton.jit
def _rows_matmul(X, stride_xm, stride_xk, W, swf, swk, offs_f, rows_on, offs_m, m_ok, K,
                 M_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """x @ W[offs_f]^T in fp32 -> [M_PAD, BLOCK_F]; rows with rows_on False are never loaded."""
    if M_PAD == 1:
        acc = tl.zeros([BLOCK_F, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_F], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [M_PAD, BLOCK_K]
        w = tl.load(W + offs_f[:, None] * swf + offs_k[None, :] * swk,
                    mask=rows_on[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_F, BLOCK_K]
        if M_PAD == 1:
            acc += w.to(tl.float32) * tl.sum(xt.to(tl.float32), axis=0)[None, :]
        elif DOT_PRECISION == "upcast":  # the CPU interpreter gets bf16 dots wrong
            acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt.to(w.dtype), tl.trans(w), acc, input_precision=DOT_PRECISION)
    if M_PAD == 1:
        out = tl.sum(acc, axis=1)[None, :]
    else:
        out = acc
    return out


@triton.jit
def _gate_up_kernel(
    X, WG, WU, H,
    stride_xm, stride_xk, s_gf, s_gk, s_uf, s_uk,
    M, K, F, thr,
    M_BUCKET, SPARSITY_KEY, DEVICE_KEY,  # only for the autotune key
    ACT: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    # 1. dense gate, activation and threshold, all in fp32
    g = _rows_matmul(X, stride_xm, stride_xk, WG, s_gf, s_gk, offs_f, f_ok, offs_m, m_ok, K,
                     M_PAD, BLOCK_F, BLOCK_K, DOT_PRECISION)
    g = _activation(g, ACT)
    on = (tl.abs(g) > thr) & m_ok[:, None] & f_ok[None, :]  # [M_PAD, BLOCK_F]
    row_on = tl.max(on.to(tl.int32), axis=0) > 0  # neurons some batch row needs
    # 2. up_proj only for those neurons; a block with none skips the loop entirely
    u = tl.zeros([M_PAD, BLOCK_F], dtype=tl.float32)
    if tl.max(row_on.to(tl.int32), axis=0) > 0:
        u = _rows_matmul(X, stride_xm, stride_xk, WU, s_uf, s_uk, offs_f, row_on, offs_m, m_ok, K,
                         M_PAD, BLOCK_F, BLOCK_K, DOT_PRECISION)
    h = tl.where(on, g * u, 0.0)
    tl.store(H + offs_m[:, None] * F + offs_f[None, :], h, mask=m_ok[:, None] & f_ok[None, :])


def _cfg(block_f, block_k, warps, stages=1):
    return triton.Config(dict(BLOCK_F=block_f, BLOCK_K=block_k), num_warps=warps, num_stages=stages)


CONFIGS_M1 = [_cfg(16, 256, 4), _cfg(32, 128, 4), _cfg(32, 256, 4), _cfg(64, 128, 8), _cfg(8, 512, 4)]
CONFIGS_DOT = [_cfg(32, 64, 4, 3), _cfg(64, 64, 4, 3), _cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3)]
INTERPRET_CONFIG = dict(BLOCK_F=32, BLOCK_K=32, num_warps=4)
#: False sends batches of 2..16 rows to the dense fallback. The fused gate/up kernel was exact
#: on an H100 at every batch; the down projection goes through `sparse_gemv`'s batch paths,
#: which are switched off there (see `sparse_gemv.DOT_PATH_ENABLED`).
DOT_PATH_ENABLED = True

_TUNERS: dict[int, object] = {}


def _tuned_kernel(m_pad: int):
    if m_pad not in _TUNERS:
        configs = CONFIGS_M1 if m_pad == 1 else CONFIGS_DOT
        key = ["K", "F", "M_BUCKET", "SPARSITY_KEY", "DEVICE_KEY", "ACT"]
        _TUNERS[m_pad] = rt.autotune(configs, key)(_gate_up_kernel)
    return _TUNERS[m_pad]


def launch_gate_up(x, w_gate, w_up, act, act_threshold, sparsity_hint=None, config=None) -> torch.Tensor:
    """h = mask * act(x Wg^T) * (x Wu^T) in fp32, [M, F]."""
    assert act in ACTIVATIONS, f"act must be one of {ACTIVATIONS}, got {act!r}"
    M, K = x.shape
    Fn = w_gate.shape[0]
    assert w_gate.shape == (Fn, K) and w_up.shape == (Fn, K) and w_up.dtype == w_gate.dtype
    assert 1 <= M <= rt.MAX_ROWS
    h = torch.empty((M, Fn), dtype=torch.float32, device=x.device)
    m_pad = 1 if M == 1 else 16
    args = [x, w_gate, w_up, h, x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1),
            w_up.stride(0), w_up.stride(1), M, K, Fn, float(act_threshold),
            rt.batch_bucket(M), rt.sparsity_bucket(sparsity_hint), rt.device_key(x.device)]
    meta = dict(ACT=act, M_PAD=m_pad, DOT_PRECISION=rt.dot_precision(w_gate.dtype))
    grid = lambda meta_: (triton.cdiv(Fn, meta_["BLOCK_F"]),)  # noqa: E731
    if config is None and rt.interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        _gate_up_kernel[grid(config)](*args, **meta, **config)
    else:
        _tuned_kernel(m_pad)[grid](*args, **meta)
    return h


def launch_gated_mlp_cats(x, w_gate, w_up, w_down, act, act_threshold, sparsity_hint=None,
                          gate_config=None, down_config=None) -> torch.Tensor:
    """Always the Triton kernels: fused gate/up, then the sparse down projection on h."""
    assert w_down.shape[1] == w_gate.shape[0]
    h = launch_gate_up(x, w_gate, w_up, act, act_threshold, sparsity_hint, gate_config)
    (out,) = launch_sparse_linear(h, [w_down], [None], [0.0], None, sparsity_hint,
                                  out_dtype=x.dtype, config=down_config)
    return out


def _act_torch(g: torch.Tensor, act: str) -> torch.Tensor:
    from actsparse.kernels.reference import activation

    return activation(act, g)


def gated_mlp_cats_reference(x, w_gate, w_up, w_down, act, act_threshold, sparsity_hint=None) -> torch.Tensor:
    """Pure-torch reference: everything in fp32, cast to x's dtype at the end."""
    xf = x.to(torch.float32)
    g = _act_torch(xf @ w_gate.to(torch.float32).t(), act)
    mask = g.abs() > float(act_threshold)  # fp32 compare, no host-to-device copy
    h = torch.where(mask, g * (xf @ w_up.to(torch.float32).t()), torch.zeros((), device=x.device))
    return (h @ w_down.to(torch.float32).t()).to(x.dtype)


def dense_gated_mlp_cats(x, w_gate, w_up, w_down, act, act_threshold) -> torch.Tensor:
    """Dense fallback (prefill, or batches whose union is dense): cuBLAS on the same storage."""
    g = _act_torch(F.linear(x, w_gate).to(torch.float32), act)
    mask = g.abs() > float(act_threshold)  # fp32 compare, no host-to-device copy
    h = torch.where(mask, g * F.linear(x, w_up).to(torch.float32), torch.zeros((), device=x.device))
    return F.linear(h.to(x.dtype), w_down)


__all__ = ["launch_gated_mlp_cats", "launch_gate_up", "gated_mlp_cats_reference", "dense_gated_mlp_cats",
           "ACTIVATIONS"]
