"""Input-sparse linear over quantized input-major weights: y = (x masked by |x| > t) @ dequant(W).

The weights are ``actsparse.quant.storage``'s: int8 [K, N] with one scale per output (or, grouped,
one per group of G input channels and output: GGUF Q8_0's layout), or int4
packed two per byte [K, N / 2] (byte j of row k: output j low nibble, output j + N / 2 high
nibble) with a scale and an offset per (group of G input channels, output). Row k is input
channel k's weights, contiguous, so a channel no batch row needs costs no weight bytes.

One program per (block of BLOCK_N byte columns) x (chunk of CHUNK input channels), split-K:

1. Per step of BLOCK_K channels: load x[:, step] for the M rows, apply each row's cutoff, take
   the union over rows. The weight loads are predicated on that union: a masked load issues no
   memory transaction, so an inactive channel's row is never read (TEAL's scheme; no compacted
   channel list, so at high sparsity the loop still takes one iteration per BLOCK_K channels).
2. Dequantise in registers, accumulate in fp32. int8: ``x * q`` summed, the per-output scale
   applied once at the end; grouped int8: ``x * q * s[group]``. int4: a step lies inside one
   group (BLOCK_K divides G; grouped int8 too), so the
   group's scales and offsets are loaded once per step, and only if some channel of the step is
   active; each channel is skipped on its own (granularity: one input channel, N / 2 bytes).
   The low nibbles feed outputs [j], the high ones outputs [j + N / 2]: two accumulators, no
   interleaving.
3. One row (M = 1): fp32 FMAs, reduced over k once at the end. 2..16 rows: the rows padded to 16
   and one ``tl.dot`` per step (the weight tile cast to x's dtype; fp32 inputs stay fp32).
4. The partial sums are added with fp32 atomics to a zeroed fp32 output; the launcher adds the
   bias and casts to x's dtype (two small torch ops; CUDA-graph safe, no host sync).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

import triton
import triton.language as tl

from actsparse.kernels.triton import _runtime as rt
from actsparse.kernels.triton.sparse_gemv import _row_cutoffs


@triton.jit
def _quant_gemv_kernel(
    X, RS, Q, S, Z, Y, thr,
    M, K, NC, N, G,
    stride_xm, stride_xk, stride_qk,
    KEY_M, KEY_BITS, KEY_S, KEY_DEV,  # only for the autotune key
    BITS: tl.constexpr, GROUPED: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # byte columns of Q (outputs, int8)
    c_ok = offs_c < NC
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    cutoff = _row_cutoffs(thr, RS, offs_m, m_ok, HAS_ROW_SCALE, M_PAD)
    if M_PAD == 1:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        acc_hi = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)

    k0 = pid_k * CHUNK
    for kb in range(0, CHUNK, BLOCK_K):
        rows = k0 + kb + tl.arange(0, BLOCK_K)
        r_ok = rows < K
        xg = tl.load(X + offs_m[:, None] * stride_xm + rows[None, :] * stride_xk,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [M_PAD, BLOCK_K]
        keep = (tl.abs(xg.to(tl.float32)) > cutoff[:, None]) & m_ok[:, None] & r_ok[None, :]
        on = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: some row needs the channel
        q = tl.load(Q + rows[:, None] * stride_qk + offs_c[None, :], mask=on[:, None] & c_ok[None, :], other=0)
        if BITS == 8 and GROUPED:
            grp = (k0 + kb) // G
            n_on = tl.zeros([BLOCK_N], dtype=tl.int32) + tl.max(on.to(tl.int32), axis=0)
            g_s = tl.load(S + grp * N + offs_c, mask=c_ok & (n_on > 0), other=0.0).to(tl.float32)
            w = q.to(tl.float32) * g_s[None, :]
        elif BITS == 8:
            w = q.to(tl.float32)
        else:
            grp = (k0 + kb) // G
            n_on = tl.zeros([BLOCK_N], dtype=tl.int32) + tl.max(on.to(tl.int32), axis=0)
            g_ok = c_ok & (n_on > 0)  # the group's scales are read only if one of its channels is
            s_lo = tl.load(S + grp * N + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            s_hi = tl.load(S + grp * N + NC + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            z_lo = tl.load(Z + grp * N + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            z_hi = tl.load(Z + grp * N + NC + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            w = (q & 0xF).to(tl.float32) * s_lo[None, :] + z_lo[None, :]
            w_hi = (q >> 4).to(tl.float32) * s_hi[None, :] + z_hi[None, :]
        if M_PAD == 1:
            xv = tl.sum(tl.where(keep, xg.to(tl.float32), 0.0), axis=0)  # [BLOCK_K]
            acc += xv[:, None] * w
            if BITS == 4:
                acc_hi += xv[:, None] * w_hi
        else:
            xm = tl.where(keep, xg, 0.0)
            if DOT_PRECISION == "tf32":  # half-precision x: the dot in x's dtype, fp32 accumulation
                acc = tl.dot(xm, w.to(xm.dtype), acc)
                if BITS == 4:
                    acc_hi = tl.dot(xm, w_hi.to(xm.dtype), acc_hi)
            else:  # fp32 x, or bf16 under the interpreter (its bf16 dots are wrong): fp32 dots
                acc = tl.dot(xm.to(tl.float32), w, acc, input_precision="ieee")
                if BITS == 4:
                    acc_hi = tl.dot(xm.to(tl.float32), w_hi, acc_hi, input_precision="ieee")

    if M_PAD == 1:
        part = tl.sum(acc, axis=0)[None, :]
        part_hi = tl.sum(acc_hi, axis=0)[None, :]
    else:
        part = acc
        part_hi = acc_hi
    out_ok = m_ok[:, None] & c_ok[None, :]
    if BITS == 8 and not GROUPED:
        s = tl.load(S + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        part = part * s[None, :]
    tl.atomic_add(Y + offs_m[:, None] * N + offs_c[None, :], part, mask=out_ok, sem="relaxed")
    if BITS == 4:
        tl.atomic_add(Y + offs_m[:, None] * N + NC + offs_c[None, :], part_hi, mask=out_ok, sem="relaxed")


def _cfg(block_n, block_k, chunk, warps):
    return triton.Config(dict(BLOCK_N=block_n, BLOCK_K=block_k, CHUNK=chunk), num_warps=warps)


CONFIGS_M1 = [_cfg(128, 32, 256, 4), _cfg(256, 16, 256, 4), _cfg(64, 32, 512, 4), _cfg(128, 32, 1024, 4),
              _cfg(256, 32, 512, 8), _cfg(128, 16, 128, 4)]
CONFIGS_DOT = [_cfg(64, 32, 256, 4), _cfg(128, 32, 512, 4), _cfg(128, 16, 256, 4), _cfg(256, 32, 512, 8)]
#: The interpreter's config (no autotuning there) unless a test passes its own.
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, num_warps=4)


def _prune(configs, named_args, **kwargs):
    """Drop configs much larger than the problem, and int4 steps that would straddle a group."""
    k, nc, g = named_args["K"], named_args["NC"], named_args["G"]
    keep = [c for c in configs if c.kwargs["CHUNK"] <= max(2 * k, 128) and c.kwargs["BLOCK_N"] <= max(2 * nc, 64)
            and (g == 0 or g % c.kwargs["BLOCK_K"] == 0)]
    return keep or configs[-1:]


_TUNERS: dict[int, object] = {}


def _tuned(m_pad: int):
    if m_pad not in _TUNERS:
        kwargs = dict(configs=CONFIGS_M1 if m_pad == 1 else CONFIGS_DOT,
                      key=["K", "NC", "KEY_M", "KEY_BITS", "KEY_S", "KEY_DEV"],
                      reset_to_zero=["Y"], do_bench=rt.autotune_bench, cache_results=True,
                      prune_configs_by={"early_config_prune": _prune})
        accepted = inspect.signature(triton.autotune).parameters
        _TUNERS[m_pad] = triton.autotune(**{k: v for k, v in kwargs.items() if k in accepted})(_quant_gemv_kernel)
    return _TUNERS[m_pad]


def rows_pad(m: int) -> int:
    """Rows the kernel is specialised for: 1 (FMA path) or 16 (tl.dot path)."""
    return 1 if m == 1 else 16


def launch_quant_sparse_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               offsets: Optional[torch.Tensor], bias: Optional[torch.Tensor], threshold: float,
                               bits: int, group_size: int, row_scale: Optional[torch.Tensor] = None,
                               sparsity_hint: Optional[float] = None, config: Optional[dict] = None) -> torch.Tensor:
    """Always the Triton kernel, on x [M, K] (1..16 rows). ``row_scale`` [M] multiplies the
    threshold per row (statistical top-k). ``config`` pins a config (tests)."""
    assert x.dim() == 2 and 1 <= x.shape[0] <= rt.MAX_ROWS, f"x must be [1..{rt.MAX_ROWS}, K]"
    assert bits in (8, 4) and qweight.is_contiguous() and qweight.dim() == 2
    M, K = x.shape
    assert qweight.shape[0] == K, f"qweight must be [K={K}, ...], got {tuple(qweight.shape)}"
    nc = qweight.shape[1]
    n = nc if bits == 8 else 2 * nc
    if bits == 4:
        assert offsets is not None and group_size > 0 and K % group_size == 0
        assert scales.shape == (K // group_size, n) and offsets.shape == scales.shape
        offsets = offsets.contiguous()
    elif group_size:
        assert K % group_size == 0 and scales.shape == (K // group_size, n)
    else:
        assert scales.shape == (n,)
        group_size = 0
    scales = scales.contiguous()
    y = torch.zeros((M, n), dtype=torch.float32, device=x.device)
    rs = None
    if row_scale is not None:
        rs = row_scale.reshape(-1).to(torch.float32).contiguous()
        assert rs.numel() == M
    m_pad = rows_pad(M)
    args = [x, rs if rs is not None else y, qweight, scales, offsets if offsets is not None else scales, y,
            float(threshold), M, K, nc, n, group_size, x.stride(0), x.stride(1), qweight.stride(0),
            m_pad, bits + (100 if group_size else 0), rt.sparsity_bucket(sparsity_hint), rt.device_key(x.device)]
    meta = dict(BITS=bits, GROUPED=group_size > 0, HAS_ROW_SCALE=rs is not None, M_PAD=m_pad, DOT_PRECISION=rt.dot_precision(x.dtype))

    def grid(meta_):
        return (triton.cdiv(nc, meta_["BLOCK_N"]), triton.cdiv(K, meta_["CHUNK"]))

    if config is None and rt.interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        cfg = dict(config)
        assert group_size == 0 or group_size % cfg["BLOCK_K"] == 0, "BLOCK_K must divide the group"
        _quant_gemv_kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        _tuned(m_pad)[grid](*args, **meta)
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype)
