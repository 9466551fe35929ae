"""Gated MLP with a neuron mask in Triton: out = (mask * act(x Wg^T) * (x Wu^T)) Wd^T.

Why it is fast
--------------
Where no token of the batch needs neuron f, its rows of up_proj (and of gate_proj, when the
mask does not come from the gate) and its column of down_proj are never read. The mask comes
from one of two places, a compile-time choice (MASK_FROM_GATE):

* CATS (True): the gate is computed densely and decides, ``mask = |act(x Wg^T)| > t``;
* a learned predictor (False): the mask is given before the MLP runs, so the gate rows of
  masked-off neurons are skipped too.

Two launches:

1. `_gate_up_kernel`, one program per block of BLOCK_F neurons: the gate GEMV (all rows, or
   only the masked-in ones), the activation and the mask in fp32, then the up GEMV over the
   same K with each w_up row's loads predicated on "some batch row needs this neuron".
   Row-major w_gate / w_up keep a neuron's K weights contiguous, so a skipped neuron skips a
   contiguous row; a block with no active neuron skips its loops. It writes h = mask * g * u
   in fp32 (no rounding before down).
2. down_proj is an input-sparse linear on h with threshold 0 (exactly the zeros of h): the
   compacting split-K kernel of `sparse_gemv` over input-major w_down.
"""

from __future__ import annotations

from typing import Optional

import torch

import triton
import triton.language as tl

from actsparse.kernels.triton import _runtime as rt
from actsparse.kernels.triton.sparse_gemv import batch_path_enabled, launch_sparse_linear, rows_pad

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
    X, MASK, WG, WU, BG, BU, H,
    stride_xm, stride_xk, stride_mm, s_gf, s_gk, s_uf, s_uk,
    M, K, F, thr,
    M_BUCKET, SPARSITY_KEY, DEVICE_KEY,  # only for the autotune key
    ACT: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_FROM_GATE: tl.constexpr,
    HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    tile_ok = m_ok[:, None] & f_ok[None, :]
    bg = tl.zeros([BLOCK_F], dtype=tl.float32)
    if HAS_BG:  # a gate bias (shifted ReLU folds its shift here): added before the activation
        bg = tl.load(BG + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    if MASK_FROM_GATE:  # CATS: the dense gate decides
        g = _activation(_rows_matmul(X, stride_xm, stride_xk, WG, s_gf, s_gk, offs_f, f_ok, offs_m, m_ok, K,
                                     M_PAD, BLOCK_F, BLOCK_K, DOT_PRECISION) + bg[None, :], ACT)
        on = (tl.abs(g) > thr) & tile_ok
        row_on = tl.max(on.to(tl.int32), axis=0) > 0  # neurons some batch row needs
    else:  # the mask is given: gate rows of masked-off neurons are skipped too
        on = (tl.load(MASK + offs_m[:, None] * stride_mm + offs_f[None, :], mask=tile_ok, other=0) != 0) & tile_ok
        row_on = tl.max(on.to(tl.int32), axis=0) > 0
        g = tl.zeros([M_PAD, BLOCK_F], dtype=tl.float32)
    h = tl.zeros([M_PAD, BLOCK_F], dtype=tl.float32)
    if tl.max(row_on.to(tl.int32), axis=0) > 0:  # a block with no active neuron reads nothing more
        if not MASK_FROM_GATE:
            g = _activation(_rows_matmul(X, stride_xm, stride_xk, WG, s_gf, s_gk, offs_f, row_on, offs_m, m_ok,
                                         K, M_PAD, BLOCK_F, BLOCK_K, DOT_PRECISION) + bg[None, :], ACT)
        u = _rows_matmul(X, stride_xm, stride_xk, WU, s_uf, s_uk, offs_f, row_on, offs_m, m_ok, K,
                         M_PAD, BLOCK_F, BLOCK_K, DOT_PRECISION)
        if HAS_BU:
            u += tl.load(BU + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        h = tl.where(on, g * u, 0.0)
    tl.store(H + offs_m[:, None] * F + offs_f[None, :], h, mask=tile_ok)


def _cfg(block_f, block_k, warps, stages=1):
    return triton.Config(dict(BLOCK_F=block_f, BLOCK_K=block_k), num_warps=warps, num_stages=stages)


# One row: the CATS configs and those the predicted-mask kernel was tuned with (smaller BLOCK_F,
# longer BLOCK_K: the gate is sparse there too, so fewer rows per program pay).
CONFIGS_M1 = [_cfg(16, 256, 4), _cfg(32, 128, 4), _cfg(32, 256, 4), _cfg(64, 128, 8), _cfg(8, 512, 4),
              _cfg(8, 256, 4), _cfg(16, 512, 8), _cfg(4, 1024, 4)]
CONFIGS_DOT = [_cfg(32, 64, 4, 3), _cfg(64, 64, 4, 3), _cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3)]
INTERPRET_CONFIG = dict(BLOCK_F=32, BLOCK_K=32, num_warps=4)
#: False declares the 2..16-row path unavailable (the caller then runs the masked dense form).
DOT_PATH_ENABLED = True

_TUNERS: dict[int, object] = {}


def _tuned_kernel(m_pad: int):
    if m_pad not in _TUNERS:
        configs = CONFIGS_M1 if m_pad == 1 else CONFIGS_DOT
        key = ["K", "F", "M_BUCKET", "SPARSITY_KEY", "DEVICE_KEY", "ACT", "MASK_FROM_GATE", "HAS_BG", "HAS_BU"]
        _TUNERS[m_pad] = rt.autotune(configs, key)(_gate_up_kernel)
    return _TUNERS[m_pad]


def supports(m: int) -> bool:
    """Whether the kernels take ``m`` token rows."""
    return batch_path_enabled(m) and (rows_pad(m) == 1 or DOT_PATH_ENABLED)


def launch_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: str,
                   threshold: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                   sparsity_hint: Optional[float] = None, config: Optional[dict] = None,
                   b_gate: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h = mask * act(x Wg^T + b_gate) * (x Wu^T + b_up) in fp32, [M, F] (biases optional).

    Exactly one of ``threshold`` (CATS: mask = |act(gate)| > threshold) and ``mask`` ([M, F]
    bool, from a predictor) is given.
    """
    assert act in ACTIVATIONS, f"act must be one of {ACTIVATIONS}, got {act!r}"
    assert (threshold is None) != (mask is None), "give either threshold or mask"
    M, K = x.shape
    Fn = w_gate.shape[0]
    assert w_gate.shape == (Fn, K) and w_up.shape == (Fn, K) and w_up.dtype == w_gate.dtype
    assert 1 <= M <= rt.MAX_ROWS
    h = torch.empty((M, Fn), dtype=torch.float32, device=x.device)
    from_gate = mask is None
    if from_gate:
        mask_arg, stride_mm = h, 0  # an unread placeholder
    else:
        assert mask.shape == (M, Fn) and mask.stride(1) == 1
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask  # same bytes
        stride_mm = mask_arg.stride(0)
    for name, b in (("b_gate", b_gate), ("b_up", b_up)):
        assert b is None or (b.shape == (Fn,) and b.is_contiguous()), f"{name} must be a contiguous [{Fn}] vector"
    m_pad = rows_pad(M)
    args = [x, mask_arg, w_gate, w_up, h if b_gate is None else b_gate, h if b_up is None else b_up, h,
            x.stride(0), x.stride(1), stride_mm,
            w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1), M, K, Fn,
            float(threshold) if from_gate else 0.0,
            rt.batch_bucket(M), rt.sparsity_bucket(sparsity_hint), rt.device_key(x.device)]
    meta = dict(ACT=act, M_PAD=m_pad, DOT_PRECISION=rt.dot_precision(w_gate.dtype), MASK_FROM_GATE=from_gate,
                HAS_BG=b_gate is not None, HAS_BU=b_up is not None)
    grid = lambda meta_: (triton.cdiv(Fn, meta_["BLOCK_F"]),)  # noqa: E731
    if config is None and rt.interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        _gate_up_kernel[grid(config)](*args, **meta, **config)
    else:
        _tuned_kernel(m_pad)[grid](*args, **meta)
    return h


def launch_gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, act: str,
                     threshold: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                     sparsity_hint: Optional[float] = None, gate_config: Optional[dict] = None,
                     down_config: Optional[dict] = None, b_gate: Optional[torch.Tensor] = None,
                     b_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The two launches: masked gate/up, then the input-sparse down projection on h."""
    assert w_down.shape[1] == w_gate.shape[0]
    h = launch_gate_up(x, w_gate, w_up, act, threshold, mask, sparsity_hint, gate_config, b_gate, b_up)
    (out,) = launch_sparse_linear(h, [w_down], [b_down], [0.0], None, sparsity_hint,
                                  out_dtype=x.dtype, config=down_config)
    return out


__all__ = ["ACTIVATIONS", "DOT_PATH_ENABLED", "launch_gate_up", "launch_gated_mlp", "supports"]
