"""Input-sparse linear layers in Triton: y_i = (x masked by |x| > t_i) @ W_i^T + b_i.

Why it is fast
--------------
Decoding reads every weight once per token, so time is bytes. If input channel k is zero in
every row of the batch, the k-th column of W (N values) is never needed. Store W input-major
(`W.t().contiguous().t()`: logical shape [N, K], strides (1, N)), and those N values are one
contiguous row of memory: skipping channel k skips a whole contiguous segment.

The kernel, one program per (block of BLOCK_N outputs) x (chunk of CHUNK input channels):

1. Load x[:, chunk] for all M rows, apply each row's cutoff, take the union over rows:
   `active[k]` says whether any row needs channel k.
2. COMPACT=True (the fast path at high sparsity): a prefix sum turns `active` into a dense
   list of the active channels (written to a small scratch buffer, re-read after a barrier).
   The main loop then walks only that list, BLOCK_K active channels at a time, so every
   iteration loads BLOCK_K useful weight rows. Predicating loads on the mask alone (TEAL's
   design, COMPACT=False) issues the same number of iterations whatever the sparsity, each
   waiting a full memory latency for a few rows: that is why its gains saturate.
3. Split-K reduction without atomics on bf16: each program adds its fp32 partial sums into an
   fp32 workspace (fp32 atomics), then bumps a per-block counter. The program that arrives
   last reads the sums, adds the bias, writes y in x's dtype, and resets workspace and counter
   to zero, so the next launch needs no memset: one launch per call, CUDA-graph safe.

M (1..16 token rows) is handled in one pass: M=1 uses fp32 FMAs (x[k] * W[k, :], reduced over
k once at the end); 2..16 rows `tl.dot` with the rows padded to 16 (tensor cores are idle in a
GEMV anyway). The compacted loop is pipelined by hand (PREFETCH): the weight rows of the next
step are requested before the FMAs of this one. Up to three outputs (q/k/v, gate/up) share x
and one launch; each has its own threshold, weights, strides and bias, and its own blocks in
grid axis 0.

What keeps a call under the ideal 1/(1-s) is a fixed cost per call (x load and compaction
before the first weight load, the counter round trip and the last program's read after the
last one); the benchmarks measure it. The batch kernels stream weights less efficiently than
cuBLAS, so the cost model in ``actsparse.ops`` sends dense-union batches to the masked dense
matmul instead.

A second family, ``predicated_gemv`` (TEAL's scheme: predicated loads, no list, partial sums
by relaxed atomics and a tiny finishing launch), has a smaller fixed cost; `launch_sparse_linear`
times both once per shape, batch bucket and sparsity bucket and keeps the faster
(`choose_family`; `forced_family` pins one).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

import triton
import triton.language as tl

from actsparse.kernels.triton import _runtime as rt

try:  # grid dependency control (Hopper); absent from old Tritons, never used in the interpreter
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
    PDL_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    _gdc_wait = _gdc_launch_dependents = None
    PDL_AVAILABLE = False

MAX_OUTPUTS = 3
MIN_BLOCK_N = 16  # the smallest BLOCK_N of any config: sizes the counter buffer


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_cutoffs(thr, RS, offs_m, m_ok, HAS_ROW_SCALE: tl.constexpr, M_PAD: tl.constexpr):
    """Each row's cutoff: the threshold, times the row's scale where one is given (per-token rules)."""
    if HAS_ROW_SCALE:
        cutoff = thr * tl.load(RS + offs_m, mask=m_ok, other=1.0).to(tl.float32)
    else:
        cutoff = tl.zeros([M_PAD], dtype=tl.float32) + thr
    return cutoff


@triton.jit
def _chunk_union(X, stride_xm, stride_xk, RS, thr, CT, k0, K, M, CHUNK: tl.constexpr, M_PAD: tl.constexpr,
                 HAS_ROW_SCALE: tl.constexpr, HAS_CT: tl.constexpr):
    """[CHUNK] int32: 1 where some row needs channel k0 + i (one row at a time: elementwise ORs
    only, no cross-thread reduction before the prefix sum that compacts it)."""
    kc = k0 + tl.arange(0, CHUNK)
    active = tl.zeros([CHUNK], dtype=tl.int32)
    for m in tl.static_range(M_PAD):
        if HAS_ROW_SCALE:  # rows past M are masked below; clamp to stay in bounds
            c_m = thr * tl.load(RS + tl.minimum(M - 1, m)).to(tl.float32)
        else:
            c_m = thr
        row_ok = (kc < K) & (tl.full([CHUNK], m, tl.int32) < M)
        xr = tl.load(X + m * stride_xm + kc * stride_xk, mask=row_ok, other=0.0)
        if HAS_CT:  # the same fp32 products as in `_load_tile`, so the union matches
            ctc = tl.load(CT + kc, mask=kc < K, other=0.0)
            hit = (tl.abs(xr.to(tl.float32)) > c_m * ctc) & row_ok
        else:
            hit = (tl.abs(xr.to(tl.float32)) > c_m) & row_ok
        active = tl.maximum(active, hit.to(tl.int32))
    return active


@triton.jit
def _load_tile(X, stride_xm, stride_xk, W, swn, swk, rows, valid, offs_m, m_ok, offs_n, n_ok, cutoff,
               CT, UNION_KNOWN: tl.constexpr, HAS_CT: tl.constexpr, W_EVICT: tl.constexpr = ""):
    """Issue the loads of one step: x[:, rows] and the weight rows some batch row needs.

    UNION_KNOWN: `valid` already marks exactly the rows some batch row needs (compacted list),
    so the weight loads need not wait for the x loads (no union over the batch rows here).
    """
    xg = tl.load(X + offs_m[:, None] * stride_xm + rows[None, :] * stride_xk,
                 mask=m_ok[:, None] & valid[None, :], other=0.0)  # [M_PAD, BLOCK_K]
    if HAS_CT:  # per-channel thresholds: cutoff[m, k] = row cutoff * channel threshold
        ct = tl.load(CT + rows, mask=valid, other=0.0)
        keep = tl.abs(xg.to(tl.float32)) > cutoff[:, None] * ct[None, :]
    else:
        keep = tl.abs(xg.to(tl.float32)) > cutoff[:, None]
    if UNION_KNOWN:
        row_on = valid
    else:
        row_on = (tl.max(keep.to(tl.int32), axis=0) > 0) & valid  # union over the batch rows
    # A masked load issues no memory transaction: inactive rows cost nothing but the issue slot.
    w = tl.load(W + rows[:, None] * swk + offs_n[None, :] * swn,
                mask=row_on[:, None] & n_ok[None, :], other=0.0, eviction_policy=W_EVICT)  # [BLOCK_K, BLOCK_N]
    return xg, keep, w


@triton.jit
def _fma(acc, xg, keep, w, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += (x masked by keep) @ w, in fp32."""
    if M_PAD == 1:
        xv = tl.sum(tl.where(keep, xg.to(tl.float32), 0.0), axis=0)  # [BLOCK_K]
        acc += xv[:, None] * w.to(tl.float32)  # reduced over k once, after the loop
    else:  # rows padded to 16: one tensor-core dot per step (they are idle in a GEMV anyway)
        xm = tl.where(keep, xg, 0.0).to(w.dtype)
        if DOT_PRECISION == "upcast":  # Triton's CPU interpreter gets bf16 dots wrong
            acc = tl.dot(xm.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xm, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_tile(X, stride_xm, stride_xk, RS, WS, CNT, SCR,
                 W, swn, swk, B, Y, N, thr, CT,
                 blk, col0, cnt_idx, scr_base,
                 M, K, N_TOTAL,
                 HAS_BIAS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, M_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                 COMPACT: tl.constexpr, PREFETCH: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 IDX_CACHE: tl.constexpr, W_EVICT: tl.constexpr, HAS_CT: tl.constexpr,
                 PDL: tl.constexpr = 0, PROBE: tl.constexpr = 0):
    """One program: outputs [blk*BLOCK_N, +BLOCK_N) of one linear, input channels of chunk pid_k."""
    pid_k = tl.program_id(1)
    k0 = pid_k * CHUNK
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    cutoff = _row_cutoffs(thr, RS, offs_m, m_ok, HAS_ROW_SCALE, M_PAD)
    if M_PAD == 1:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)

    if COMPACT:
        # 1. which channels of this chunk does any row need? (the union, one row at a time:
        # elementwise ORs only, no cross-thread reduction before the prefix sum)
        offs_c = tl.arange(0, CHUNK)
        active = _chunk_union(X, stride_xm, stride_xk, RS, thr, CT, k0, K, M, CHUNK, M_PAD, HAS_ROW_SCALE, HAS_CT)
        # 2. compact them: the i-th active channel goes to slot i of this chunk's scratch.
        # Every program of the same (output, chunk) writes the same list, so sharing is safe.
        pos = tl.cumsum(active, axis=0) - 1
        n_act = tl.sum(active, axis=0)
        if PROBE == 2 or PROBE == 3:  # timing probe: compaction without the weight loop
            n_act = n_act * 0
        scr = SCR + scr_base + k0
        tl.store(scr + pos, offs_c, mask=active > 0)
        tl.debug_barrier()  # the list is written by all threads, read back by all threads
        # The list is read through L1 (IDX_CACHE "": the default caching). The barrier makes this
        # program's stores visible to its own threads; other programs of the same chunk write
        # the same values, so a line another program brought into L1 holds the same list.
        # (Reading from L2 instead, ".cg", cost 10-25% at batch 1 on an H100.)
        # 3. walk the list, BLOCK_K active channels per step.
        offs_j = tl.arange(0, BLOCK_K)
        idx = tl.load(scr + offs_j, mask=offs_j < n_act, other=0, cache_modifier=IDX_CACHE)
        if PREFETCH:
            # Software pipelining by hand: the loads of step j+1 are issued before the FMAs
            # of step j, and the indices two steps ahead, so two steps of weight rows are in
            # flight per program (Triton does not pipeline this data-dependent loop itself).
            xg, keep, w = _load_tile(X, stride_xm, stride_xk, W, swn, swk, k0 + idx, offs_j < n_act,
                                     offs_m, m_ok, offs_n, n_ok, cutoff, CT, True, HAS_CT, W_EVICT)
            nxt = BLOCK_K + offs_j
            idx = tl.load(scr + nxt, mask=nxt < n_act, other=0, cache_modifier=IDX_CACHE)
            for j in range(0, n_act, BLOCK_K):
                nj = j + BLOCK_K + offs_j
                xg_n, keep_n, w_n = _load_tile(X, stride_xm, stride_xk, W, swn, swk, k0 + idx, nj < n_act,
                                               offs_m, m_ok, offs_n, n_ok, cutoff, CT, True, HAS_CT, W_EVICT)
                nn = nj + BLOCK_K
                idx = tl.load(scr + nn, mask=nn < n_act, other=0, cache_modifier=IDX_CACHE)
                if M_PAD > 1:
                    tl.debug_barrier()  # keep the dot's shared-memory staging apart between steps
                acc = _fma(acc, xg, keep, w, M_PAD, DOT_PRECISION)
                xg = xg_n
                keep = keep_n
                w = w_n
        else:
            for j in range(0, n_act, BLOCK_K):
                valid = (j + offs_j) < n_act
                rows = k0 + idx
                nxt = j + BLOCK_K + offs_j
                idx = tl.load(scr + nxt, mask=nxt < n_act, other=0, cache_modifier=IDX_CACHE)
                if M_PAD > 1:
                    tl.debug_barrier()
                xg, keep, w = _load_tile(X, stride_xm, stride_xk, W, swn, swk, rows, valid,
                                         offs_m, m_ok, offs_n, n_ok, cutoff, CT, True, HAS_CT, W_EVICT)
                acc = _fma(acc, xg, keep, w, M_PAD, DOT_PRECISION)
    else:
        # TEAL-style: visit every channel of the chunk, predicate the weight loads on the mask.
        tl.static_assert(M_PAD == 1, "the predicated path is for one row; batches use COMPACT")
        for kb in range(0, CHUNK, BLOCK_K):
            rows = k0 + kb + tl.arange(0, BLOCK_K)
            xg, keep, w = _load_tile(X, stride_xm, stride_xk, W, swn, swk, rows, rows < K,
                                     offs_m, m_ok, offs_n, n_ok, cutoff, CT, False, HAS_CT, W_EVICT)
            acc = _fma(acc, xg, keep, w, M_PAD, DOT_PRECISION)

    if PDL == 2:  # the weights are read: let the next kernel start launching
        _gdc_launch_dependents()
    if M_PAD == 1:
        part = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
    else:
        part = acc  # [M_PAD, BLOCK_N]

    # 4. split-K reduction in fp32; the last program of this output block finishes it.
    # (A launch whose one chunk covers K stores its sums directly.)
    out_ok = m_ok[:, None] & n_ok[None, :]
    ws = WS + offs_m[:, None] * N_TOTAL + col0 + offs_n[None, :]
    if tl.num_programs(1) == 1:  # one chunk covers K: no partial sums to combine
        if HAS_BIAS:
            part += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * N + offs_n[None, :], part.to(Y.dtype.element_ty), mask=out_ok)
    elif PROBE != 3:  # (timing probe 3 stops before the reduction)
        tl.atomic_add(ws, part, mask=out_ok, sem="relaxed")
    if tl.num_programs(1) > 1 and PROBE != 3 and PROBE != 1:  # (probe 1: partial sums added, no fix-up)
        tl.debug_barrier()  # all threads' adds happen before the (single-thread) counter release
        done = tl.atomic_add(CNT + cnt_idx, 1, sem="acq_rel")
        if done == tl.num_programs(1) - 1:
            tot = tl.load(ws, mask=out_ok, other=0.0, cache_modifier=".cg")
            # The barrier matters: a tile's layout may give one element to several threads (a
            # reduced or tensor-core layout); without it one thread's reset could land before
            # another thread's read of the same sum, and that thread would write a zero.
            tl.debug_barrier()
            tl.store(ws, tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32), mask=out_ok)
            if HAS_BIAS:
                tot += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m[:, None] * N + offs_n[None, :], tot.to(Y.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(CNT + cnt_idx, 0)


@triton.jit
def _sparse_linear_kernel(
    X, RS, WS, CNT, SCR,
    W0, W1, W2, B0, B1, B2, Y0, Y1, Y2, CT0, CT1, CT2,
    t0, t1, t2,
    N0, N1, N2,
    s_w0n, s_w0k, s_w1n, s_w1k, s_w2n, s_w2k,
    stride_xm, stride_xk,
    M, K, N_TOTAL,
    M_BUCKET, SPARSITY_KEY, DEVICE_KEY,  # only for the autotune key
    NUM_OUT: tl.constexpr, HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_CT0: tl.constexpr, HAS_CT1: tl.constexpr, HAS_CT2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, COMPACT: tl.constexpr,
    PREFETCH: tl.constexpr = True, IDX_CACHE: tl.constexpr = "", W_EVICT: tl.constexpr = "",
    PDL: tl.constexpr = 0, PROBE: tl.constexpr = 0,
):
    """Grid: (output blocks of all outputs, K chunks). Each branch calls the tile with its own
    pointers and strides (no merged variables: strides keep their divisibility hints).

    PDL (programmatic dependent launch, Hopper; the launch must pass `launch_pdl=True`):
    1 waits for the previous kernel at the start and lets the next one launch at once;
    2 waits at the start and lets the next one launch when this program's loop is done.
    Either way nothing is read before the wait: x, the workspace and the counters may all
    have been written by the kernel before.

    PROBE (timing only, wrong results; never set by the launcher): 1 skips the split-K fix-up,
    2 skips the weight loop, 3 skips the loop and the reduction, 4 returns at once. The
    differences between them say where the fixed cost of a call goes
    (benchmarks/studies/gpu_kernel_variants.py --parts probe).
    """
    if PDL > 0:
        _gdc_wait()
    if PDL == 1:
        _gdc_launch_dependents()
    pid_n = tl.program_id(0)
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    if PROBE == 4:  # timing probe: an empty program
        pid_n = nb0 + nb1 + 2 * tl.cdiv(N2, BLOCK_N) + 1  # past every output: no branch runs
    if pid_n < nb0:
        _linear_tile(X, stride_xm, stride_xk, RS, WS, CNT, SCR, W0, s_w0n, s_w0k, B0, Y0, N0, t0, CT0,
                     pid_n, 0, pid_n, 0, M, K, N_TOTAL,
                     HAS_B0, HAS_ROW_SCALE, M_PAD, BLOCK_N, BLOCK_K, CHUNK, COMPACT, PREFETCH, DOT_PRECISION, IDX_CACHE, W_EVICT,
                     HAS_CT0, PDL, PROBE)
    elif NUM_OUT >= 2:
        if pid_n < nb0 + nb1:
            _linear_tile(X, stride_xm, stride_xk, RS, WS, CNT, SCR, W1, s_w1n, s_w1k, B1, Y1, N1, t1, CT1,
                         pid_n - nb0, N0, pid_n, K, M, K, N_TOTAL,
                         HAS_B1, HAS_ROW_SCALE, M_PAD, BLOCK_N, BLOCK_K, CHUNK, COMPACT, PREFETCH, DOT_PRECISION, IDX_CACHE, W_EVICT,
                     HAS_CT1, PDL, PROBE)
        elif NUM_OUT >= 3:
            _linear_tile(X, stride_xm, stride_xk, RS, WS, CNT, SCR, W2, s_w2n, s_w2k, B2, Y2, N2, t2, CT2,
                         pid_n - nb0 - nb1, N0 + N1, pid_n, 2 * K, M, K, N_TOTAL,
                         HAS_B2, HAS_ROW_SCALE, M_PAD, BLOCK_N, BLOCK_K, CHUNK, COMPACT, PREFETCH, DOT_PRECISION, IDX_CACHE, W_EVICT,
                     HAS_CT2, PDL, PROBE)

# ----------------------------------------------------------------------------------------------
# Configs and autotuning
# ----------------------------------------------------------------------------------------------


def _cfg(compact, chunk, block_k, block_n, warps, stages=1, prefetch=True):
    return triton.Config(dict(COMPACT=compact, CHUNK=chunk, BLOCK_K=block_k, BLOCK_N=block_n, PREFETCH=prefetch),
                         num_warps=warps, num_stages=stages)


# A short list: compaction at several chunk sizes (more programs for small layers), with and
# without the hand-pipelined loop, plus the TEAL-style predicated tile that wins when almost
# nothing is skipped. Chosen from an H100 sweep (benchmarks/kernels_h100.md).
CONFIGS_M1 = [
    _cfg(True, 256, 16, 512, 4, prefetch=False),
    _cfg(True, 512, 16, 512, 4),
    _cfg(True, 512, 16, 512, 4, prefetch=False),
    _cfg(True, 512, 16, 256, 2),
    _cfg(True, 512, 16, 256, 2, prefetch=False),
    _cfg(True, 256, 16, 256, 2, prefetch=False),
    _cfg(True, 1024, 16, 256, 2, prefetch=False),
    _cfg(True, 1024, 16, 512, 4),
    _cfg(True, 512, 32, 256, 2, prefetch=False),
    _cfg(True, 256, 32, 256, 2, prefetch=False),
    _cfg(True, 512, 64, 128, 4),
    _cfg(True, 256, 32, 128, 4, prefetch=False),
    _cfg(False, 32, 32, 256, 2),
    _cfg(False, 32, 32, 128, 2),
    _cfg(True, 512, 32, 512, 4, prefetch=False),  # best on gate/up at 25-90% in graph sweeps
]
CONFIGS_DOT = [  # 2..16 rows, padded to 16: compacted lists only, one tl.dot per step
    _cfg(True, 256, 32, 128, 4),
    _cfg(True, 512, 32, 256, 4),
    _cfg(True, 512, 64, 128, 4),
    _cfg(True, 256, 64, 256, 8),
    _cfg(True, 128, 32, 64, 4),
    _cfg(True, 256, 32, 128, 4, prefetch=False),
]
#: False sends batches of 2..16 rows to the dense fallback. The batch kernels once returned
#: wrong sums on an H100: in the split-K epilogue several threads can hold the same element
#: of a reduced or tensor-core tile, and one thread's reset of the workspace could land before
#: another's read of it. A barrier between the read and the reset fixed it (GPU self-check in
#: benchmarks/kernels_h100.md).
DOT_PATH_ENABLED = True


def rows_pad(m: int) -> int:
    """Rows the kernel is specialised for: 1 (FMA path) or 16 (tl.dot path)."""
    return 1 if m == 1 else 16


def batch_path_enabled(m: int) -> bool:
    return rows_pad(m) == 1 or DOT_PATH_ENABLED


#: Used in the interpreter (no autotuning there) unless a test passes its own.
INTERPRET_CONFIG = dict(COMPACT=True, CHUNK=32, BLOCK_K=16, BLOCK_N=32, num_warps=4)


def _prune(configs, named_args, **kwargs):
    """Drop configs whose tiles are much larger than the problem (pure waste)."""
    k, n = named_args["K"], named_args["N_TOTAL"]
    keep = [c for c in configs if c.kwargs["CHUNK"] <= max(2 * k, 128) and c.kwargs["BLOCK_N"] <= max(2 * n, 64)]
    return keep or configs[:1]


_TUNERS: dict[int, object] = {}
_LAST_COMPILED = None  # the last pinned-config launch (inspection of the generated code)


def _tuned_kernel(m_pad: int):
    if m_pad not in _TUNERS:
        configs = CONFIGS_M1 if m_pad == 1 else CONFIGS_DOT
        key = ["K", "N_TOTAL", "N0", "NUM_OUT", "M_BUCKET", "SPARSITY_KEY", "DEVICE_KEY"]
        _TUNERS[m_pad] = rt.autotune(configs, key, prune=_prune)(_sparse_linear_kernel)
    return _TUNERS[m_pad]


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def launch_sparse_linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    thresholds: Sequence[float],
    row_scale: Optional[torch.Tensor] = None,
    sparsity_hint: Optional[float] = None,
    out_dtype: Optional[torch.dtype] = None,
    config: Optional[dict] = None,
    channel_thresholds: Optional[Sequence[Optional[torch.Tensor]]] = None,
    family: Optional[str] = None,
    epilogue: Optional[str] = None,
) -> list[torch.Tensor]:
    """Always a Triton kernel (no dense fallback). `config` pins a config (tests, interpreter).

    `epilogue` (an activation name): the two outputs are a gated MLP's gate and up (same width,
    no bias), and the call returns ``[act(gate) * up]`` alone. The predicated family computes it
    in its finishing launch; the compacting one after its kernel.

    `channel_thresholds[i]`, where given, is a 1-D fp32 tensor of K per-channel cutoffs that
    replaces the scalar `thresholds[i]` (still multiplied by `row_scale` per row).

    `family`: "compact" (this module's kernel), "predicated" or "elect" (``predicated_gemv``) or None:
    the one `forced_family` names, else "compact" with a pinned config, else the faster of the
    two for this shape, batch bucket and sparsity bucket (`choose_family`).
    """
    assert x.dim() == 2, "x must be [M, K]"
    num_out = len(weights)
    assert 1 <= num_out <= MAX_OUTPUTS and len(biases) == num_out and len(thresholds) == num_out
    M, K = x.shape
    assert 1 <= M <= rt.MAX_ROWS, f"the sparse kernel takes 1..{rt.MAX_ROWS} rows, got {M}"
    dev = x.device
    w_dtype = weights[0].dtype
    for w in weights:
        assert w.dim() == 2 and w.shape[1] == K and w.dtype == w_dtype and w.device == dev
    out_dtype = out_dtype or x.dtype
    ns = [int(w.shape[0]) for w in weights]
    n_total = sum(ns)
    outs = [torch.empty((M, n), dtype=out_dtype, device=dev) for n in ns]
    if epilogue is not None:
        check_epilogue(epilogue, ns, biases)

    bs = []
    for b, w in zip(biases, weights):
        if b is not None and (b.dtype != w_dtype or not b.is_contiguous()):
            b = b.to(w_dtype).contiguous()
        bs.append(b)
    dummy_w = weights[0]
    pad = lambda seq, fill: list(seq) + [fill] * (MAX_OUTPUTS - len(seq))  # noqa: E731
    W = pad(weights, dummy_w)
    B = pad([b if b is not None else dummy_w for b in bs], dummy_w)
    Y = pad(outs, outs[0])
    T = pad([float(t) for t in thresholds], 0.0)
    N = pad(ns, 0)
    cts = list(channel_thresholds) if channel_thresholds is not None else [None] * num_out
    assert len(cts) == num_out
    for i, ct in enumerate(cts):
        if ct is not None:
            ct = ct.reshape(-1)
            assert ct.numel() == K, f"channel_thresholds[{i}] must have K={K} entries, got {ct.numel()}"
            cts[i] = ct.to(device=dev, dtype=torch.float32).contiguous()
            T[i] = 1.0  # the kernel multiplies the row cutoff (1.0 * row_scale) by the channel's
    strides = []
    for w in W:
        strides += [w.stride(0), w.stride(1)]

    rs = row_scale
    if rs is not None:
        rs = rs.reshape(-1)
        if rs.dtype != torch.float32 or not rs.is_contiguous():
            rs = rs.to(torch.float32).contiguous()
        assert rs.numel() == M

    m_pad = rows_pad(M)
    ws = rt.zeroed_buffer("ws", M * n_total, torch.float32, dev)
    CT = pad([ct if ct is not None else ws for ct in cts], ws)  # ws: an unread fp32 placeholder
    has_b = [num_out > i and bs[i] is not None for i in range(MAX_OUTPUTS)]
    has_ct = [num_out > i and cts[i] is not None for i in range(MAX_OUTPUTS)]
    key = [rt.batch_bucket(M), rt.sparsity_bucket(sparsity_hint), rt.device_key(dev)]
    common = dict(x=x, rs=rs if rs is not None else ws, ws=ws, W=W, B=B, Y=Y, CT=CT, T=T, N=N, strides=strides,
                  K=K, n_total=n_total, key=key, num_out=num_out, has_rs=rs is not None, has_b=has_b,
                  has_ct=has_ct, dot_precision=rt.dot_precision(w_dtype), epilogue=epilogue,
                  h=torch.empty((M, ns[0]), dtype=out_dtype, device=dev) if epilogue else None)

    fam = family or _family_of(config) or _FORCED_FAMILY
    fkey = None
    if fam is None:
        fkey = (K, tuple(ns), *key, x.dtype, w_dtype, out_dtype, rs is not None, tuple(has_ct), epilogue)
        fam = choose_family(fkey, {f: (lambda f=f: _run_family(f, common, ns, M, m_pad, None))
                                   for f in CHOSEN_FAMILIES})
    if fam not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {fam!r}")
    global _LAST_FAMILY, _LAST_KEY
    _LAST_FAMILY, _LAST_KEY = fam, fkey
    _run_family(fam, common, ns, M, m_pad, config)
    return [common["h"]] if epilogue else outs


def check_epilogue(act: str, ns: Sequence[int], biases: Sequence[Optional[torch.Tensor]]) -> None:
    """A gated epilogue needs exactly gate and up, of one width, without biases."""
    from actsparse.kernels.triton.gated_mlp import ACTIVATIONS

    if act not in ACTIVATIONS:
        raise ValueError(f"epilogue must be one of {ACTIVATIONS}, got {act!r}")
    if len(ns) != 2 or ns[0] != ns[1] or any(b is not None for b in biases):
        raise ValueError(f"a gated epilogue takes two outputs of one width (gate, up) without biases, got widths "
                         f"{list(ns)} and biases {[b is not None for b in biases]}")


#: the gated product after the compacting kernel, in torch (that family has no finishing launch)
_TORCH_ACTIVATIONS = {"silu": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
                      "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh")}


def _run_family(fam: str, common: dict, ns: Sequence[int], M: int, m_pad: int, config: Optional[dict]) -> None:
    if fam in ("predicated", "elect"):
        from actsparse.kernels.triton import predicated_gemv

        predicated_gemv.launch(common, ns, M, m_pad, config, elect=fam == "elect")
    else:
        _launch_compact(common, ns, M, m_pad, config)
        if common["epilogue"]:  # the compacting kernel writes gate and up: the product after it
            g, u = common["Y"][0].float(), common["Y"][1].float()
            common["h"].copy_(_TORCH_ACTIVATIONS[common["epilogue"]](g) * u)


def _launch_compact(common: dict, ns: Sequence[int], M: int, m_pad: int, config: Optional[dict]) -> None:
    c = common
    dev = c["x"].device
    cnt = rt.zeroed_buffer("cnt", sum(triton.cdiv(n, MIN_BLOCK_N) for n in ns), torch.int32, dev)
    scr = rt.scratch_buffer("idx", c["num_out"] * c["K"], torch.int32, dev)
    args = [c["x"], c["rs"], c["ws"], cnt, scr, *c["W"], *c["B"], *c["Y"], *c["CT"], *c["T"], *c["N"],
            *c["strides"], c["x"].stride(0), c["x"].stride(1), M, c["K"], c["n_total"], *c["key"]]
    has_b, has_ct = c["has_b"], c["has_ct"]
    meta = dict(NUM_OUT=c["num_out"], HAS_B0=has_b[0], HAS_B1=has_b[1], HAS_B2=has_b[2],
                HAS_ROW_SCALE=c["has_rs"], M_PAD=m_pad, DOT_PRECISION=c["dot_precision"],
                HAS_CT0=has_ct[0], HAS_CT1=has_ct[1], HAS_CT2=has_ct[2])

    def grid(meta_):
        bn = meta_["BLOCK_N"]
        return (sum(triton.cdiv(n, bn) for n in ns), triton.cdiv(c["K"], meta_["CHUNK"]))

    if config is None and rt.interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        cfg = dict(config)
        assert cfg["BLOCK_N"] >= MIN_BLOCK_N
        global _LAST_COMPILED
        kw = {**meta, **cfg}  # a pinned config may override meta (M_PAD: the dot path at M=1)
        _LAST_COMPILED = _sparse_linear_kernel[grid(kw)](*args, **kw)
    else:
        _tuned_kernel(m_pad)[grid](*args, **meta)


# ----------------------------------------------------------------------------------------------
# Family choice
# ----------------------------------------------------------------------------------------------

#: The kernel families a call can run: compacted index lists (this module), predicated loads
#: with a finishing launch, or predicated loads whose last program finishes (``predicated_gemv``).
FAMILIES = ("compact", "predicated", "elect")
#: The families timed for the per-key choice. "elect" runs only where forced: on the GPU its
#: counter round trip per program cost more than the finishing launch it saves.
CHOSEN_FAMILIES = ("compact", "predicated")
_FORCED_FAMILY: Optional[str] = None
_LAST_FAMILY: Optional[str] = None
_LAST_KEY: Optional[tuple] = None
#: The family chosen per (K, outputs, batch bucket, sparsity bucket, device, dtypes, options).
FAMILY_CHOICES: dict[tuple, str] = {}
FAMILY_TIMES: dict[tuple, dict[str, float]] = {}


@contextmanager
def forced_family(family: Optional[str]):
    """Run every call of the block with `family` (None: choose as usual); tests and benchmarks."""
    global _FORCED_FAMILY
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    old, _FORCED_FAMILY = _FORCED_FAMILY, family
    try:
        yield
    finally:
        _FORCED_FAMILY = old


def _family_of(config: Optional[dict]) -> Optional[str]:
    """The family a pinned config belongs to (its tile parameters say it)."""
    if config is None:
        return None
    if "TILES" not in config:
        return "compact"
    return "elect" if _FORCED_FAMILY == "elect" else "predicated"


def last_family() -> Optional[str]:
    """The family the last `launch_sparse_linear` call ran (benchmarks report it)."""
    return _LAST_FAMILY


def last_family_times() -> Optional[dict]:
    """Milliseconds per call of each family as timed when the last call's family was chosen
    (None: the family was forced or pinned, or chosen without timing)."""
    return dict(FAMILY_TIMES[_LAST_KEY]) if _LAST_KEY in FAMILY_TIMES else None


def _can_time() -> bool:
    return not rt.interpreting() and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()


def choose_family(key: tuple, runs: dict, bench=None) -> str:
    """The family for `key`: timed once per process (each family autotuned first, then its whole
    launch timed as the decode step runs it), then remembered.

    The interpreter, and a first call made during CUDA-graph capture (nothing can be timed
    there), take "compact" without remembering it.
    """
    if key in FAMILY_CHOICES:
        return FAMILY_CHOICES[key]
    if bench is None:
        if not _can_time():
            return "compact"
        bench = rt.autotune_bench
    times = {}
    for f, fn in runs.items():
        try:
            times[f] = float(bench(fn))
        except Exception as e:  # noqa: BLE001 - a family that fails to build or run is not chosen
            warnings.warn(f"actsparse: the {f} sparse GEMV failed for {key}, not used there: {e}", stacklevel=2)
            times[f] = math.inf
    choice = min(times, key=times.get)
    if math.isinf(times[choice]):
        choice = "compact"
    FAMILY_CHOICES[key] = choice
    FAMILY_TIMES[key] = times
    return choice


def reserve_buffers(device: torch.device, k: int, ns: Sequence[int], max_rows: int = rt.MAX_ROWS) -> None:
    """Allocate the cached workspace a site needs, ahead of time and outside any graph pool.

    CUDA-graph trees run their warm-up inside a private memory pool; a cached buffer first
    allocated there would stay alive in the pool without being a graph output, which the
    trees reject. The backend calls this at compile time for every masked site.
    """
    n_total = int(sum(ns))
    rt.zeroed_buffer("ws", max_rows * n_total, torch.float32, device)
    rt.zeroed_buffer("cnt", sum(triton.cdiv(int(n), MIN_BLOCK_N) for n in ns), torch.int32, device)
    rt.scratch_buffer("idx", len(ns) * int(k), torch.int32, device)
    from actsparse.kernels.triton import predicated_gemv

    rt.zeroed_buffer("pcnt", predicated_gemv.counters(ns), torch.int32, device)
