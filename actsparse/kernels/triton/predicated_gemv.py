"""The predicated family of the input-sparse linear: no index list, a light split-K reduction.

Why a second family
-------------------
The compacting kernel (``sparse_gemv``) pays a fixed cost per call before its first weight load
(x load, union, prefix sum, barrier, list read back) and after its last (a counter round trip
per program, the last program's read of the sums). On a large layer that cost hides behind
tens of microseconds of weight reads; on a small one (q/o, k/v) it is a large part of the call,
and a kernel that starts loading weights sooner wins even if it visits every channel.

This family does what TEAL's kernel does, in our own form:

1. Each program owns BLOCK_N outputs and TILES x BLOCK_K input channels (split-K). It loads the
   x values of each tile, compares them with the row cutoffs and loads only the weight rows of
   the channels some batch row needs: a masked load issues no memory transaction, so skipped
   rows cost an issue slot, not bytes. The TILES loop is unrolled (``static_range``): no load
   depends on another tile's data, so every weight request of the program can be in flight at
   once, right after the x loads.
2. The partial sums go to the fp32 workspace by relaxed atomics (fire and forget, no fence, no
   counter, no last-program election); a program none of whose channels is active adds nothing
   (SKIP_EMPTY), which saves atomics at high sparsity.
3. A second, tiny launch reads the sums, adds the bias, writes y in its dtype and zeroes the
   workspace for the next call (CUDA-graph safe: no memset, nothing sized by the data). For a
   gated MLP's gate and up it writes ``act(gate) * up`` instead (``epilogue``), which saves the
   product its own launch.

The "elect" variant (its own family, ``launch(..., elect=True)``) drops the finishing launch:
each program bumps a counter per output block after its partial sums, and the last to arrive
reads the sums, resets them and the counter, and writes y (or the gated product). It trades a
launch (and the gap before it) for one counter round trip per program, as the compacting kernel
does, but keeps the predicated loads. Measured on the GPU that trade loses (many small programs
share each counter), so the launcher runs it only where forced.

1 row uses fp32 FMAs; 2..16 rows one ``tl.dot`` per tile on the rows padded to 16 (the union of
the rows' masks predicates the loads). Which family runs for a shape, batch bucket and
sparsity bucket is decided by timing both (``sparse_gemv.launch_sparse_linear``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from actsparse.kernels.triton import _runtime as rt
from actsparse.kernels.triton.gated_mlp import _activation
from actsparse.kernels.triton.sparse_gemv import _fma, _load_tile, _row_cutoffs


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _predicated_tile(X, stride_xm, stride_xk, RS, WS, W, swn, swk, N, thr, CT, blk, col0, M, K, N_TOTAL,
                     HAS_ROW_SCALE: tl.constexpr, HAS_CT: tl.constexpr, M_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, W_EVICT: tl.constexpr, SKIP_EMPTY: tl.constexpr):
    """One program: outputs [blk*BLOCK_N, +BLOCK_N) of one linear, TILES*BLOCK_K input channels."""
    k0 = tl.program_id(1) * (TILES * BLOCK_K)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    cutoff = _row_cutoffs(thr, RS, offs_m, m_ok, HAS_ROW_SCALE, M_PAD)
    if M_PAD == 1:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    hit = 0
    for t in tl.static_range(TILES):  # unrolled: the tiles' loads do not wait for each other
        rows = k0 + t * BLOCK_K + tl.arange(0, BLOCK_K)
        xg, keep, w = _load_tile(X, stride_xm, stride_xk, W, swn, swk, rows, rows < K, offs_m, m_ok, offs_n, n_ok,
                                 cutoff, CT, False, HAS_CT, W_EVICT)
        acc = _fma(acc, xg, keep, w, M_PAD, DOT_PRECISION)
        if SKIP_EMPTY:
            hit += tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
    if M_PAD == 1:
        part = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
    else:
        part = acc
    ws = WS + offs_m[:, None] * N_TOTAL + col0 + offs_n[None, :]
    if SKIP_EMPTY:  # no active channel in this program's range: nothing to add (fewer atomics at high s)
        if hit > 0:
            tl.atomic_add(ws, part, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")
    else:
        tl.atomic_add(ws, part, mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")


@triton.jit
def _predicated_kernel(
    X, RS, WS,
    W0, W1, W2, CT0, CT1, CT2,
    t0, t1, t2,
    N0, N1, N2,
    s_w0n, s_w0k, s_w1n, s_w1k, s_w2n, s_w2k,
    stride_xm, stride_xk,
    M, K, N_TOTAL,
    M_BUCKET, SPARSITY_KEY, DEVICE_KEY,  # only for the autotune key
    NUM_OUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_CT0: tl.constexpr, HAS_CT1: tl.constexpr, HAS_CT2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr, W_EVICT: tl.constexpr = "",
    SKIP_EMPTY: tl.constexpr = True,
):
    """Grid: (output blocks of all outputs, K / (TILES * BLOCK_K)). Partial sums only: the
    finishing launch writes y."""
    pid_n = tl.program_id(0)
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    if pid_n < nb0:
        _predicated_tile(X, stride_xm, stride_xk, RS, WS, W0, s_w0n, s_w0k, N0, t0, CT0, pid_n, 0, M, K, N_TOTAL,
                         HAS_ROW_SCALE, HAS_CT0, M_PAD, BLOCK_N, BLOCK_K, TILES, DOT_PRECISION, W_EVICT, SKIP_EMPTY)
    elif NUM_OUT >= 2:
        if pid_n < nb0 + nb1:
            _predicated_tile(X, stride_xm, stride_xk, RS, WS, W1, s_w1n, s_w1k, N1, t1, CT1, pid_n - nb0, N0,
                             M, K, N_TOTAL, HAS_ROW_SCALE, HAS_CT1, M_PAD, BLOCK_N, BLOCK_K, TILES, DOT_PRECISION,
                             W_EVICT, SKIP_EMPTY)
        elif NUM_OUT >= 3:
            _predicated_tile(X, stride_xm, stride_xk, RS, WS, W2, s_w2n, s_w2k, N2, t2, CT2, pid_n - nb0 - nb1,
                             N0 + N1, M, K, N_TOTAL, HAS_ROW_SCALE, HAS_CT2, M_PAD, BLOCK_N, BLOCK_K, TILES,
                             DOT_PRECISION, W_EVICT, SKIP_EMPTY)


@triton.jit
def _elect_finish(WS, CNT, cidx, target, Y, B, N, col0, blk, M, N_TOTAL, HAS_BIAS: tl.constexpr,
                  ACT: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """After a program's partial sums: bump the block's counter; the last of ``target`` programs
    to arrive writes the block (y + bias, or with ``ACT`` the product act(gate) * up, gate at
    ``col0`` and up N columns after it) and leaves the sums and the counter at zero."""
    tl.debug_barrier()  # all threads' adds happen before the (single-thread) counter release
    done = tl.atomic_add(CNT + cidx, 1, sem="acq_rel")
    if done == target - 1:
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, M_PAD)
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ws = WS + offs_m[:, None] * N_TOTAL + col0 + offs_n[None, :]
        tot = tl.load(ws, mask=ok, other=0.0, cache_modifier=".cg")
        if ACT != "":
            up = tl.load(ws + N, mask=ok, other=0.0, cache_modifier=".cg")
        # every thread has read its sums before any is reset (a layout may replicate elements)
        tl.debug_barrier()
        tl.store(ws, tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32), mask=ok)
        if ACT != "":
            tl.store(ws + N, tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32), mask=ok)
            tot = _activation(tot, ACT) * up
        elif HAS_BIAS:
            tot += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * N + offs_n[None, :], tot.to(Y.dtype.element_ty), mask=ok)
        tl.atomic_xchg(CNT + cidx, 0)


@triton.jit
def _predicated_elect_kernel(
    X, RS, WS, CNT,
    W0, W1, W2, CT0, CT1, CT2, B0, B1, B2, Y0, Y1, Y2,
    t0, t1, t2,
    N0, N1, N2,
    s_w0n, s_w0k, s_w1n, s_w1k, s_w2n, s_w2k,
    stride_xm, stride_xk,
    M, K, N_TOTAL,
    M_BUCKET, SPARSITY_KEY, DEVICE_KEY,  # only for the autotune key
    NUM_OUT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_CT0: tl.constexpr, HAS_CT1: tl.constexpr, HAS_CT2: tl.constexpr,
    HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr, W_EVICT: tl.constexpr = "",
    SKIP_EMPTY: tl.constexpr = True,
):
    """Grid as ``_predicated_kernel``; the last program of each output block writes it (no
    finishing launch). With ``ACT`` the two outputs are gate and up: a gate block and the up
    block of the same columns share one counter, and Y0 receives act(gate) * up."""
    pid_n = tl.program_id(0)
    nk = tl.num_programs(1)
    nb0 = tl.cdiv(N0, BLOCK_N)
    nb1 = tl.cdiv(N1, BLOCK_N)
    if pid_n < nb0:
        _predicated_tile(X, stride_xm, stride_xk, RS, WS, W0, s_w0n, s_w0k, N0, t0, CT0, pid_n, 0, M, K, N_TOTAL,
                         HAS_ROW_SCALE, HAS_CT0, M_PAD, BLOCK_N, BLOCK_K, TILES, DOT_PRECISION, W_EVICT, SKIP_EMPTY)
        if ACT != "":
            _elect_finish(WS, CNT, pid_n, 2 * nk, Y0, B0, N0, 0, pid_n, M, N_TOTAL, False, ACT, M_PAD, BLOCK_N)
        else:
            _elect_finish(WS, CNT, pid_n, nk, Y0, B0, N0, 0, pid_n, M, N_TOTAL, HAS_B0, "", M_PAD, BLOCK_N)
    elif NUM_OUT >= 2:
        if pid_n < nb0 + nb1:
            _predicated_tile(X, stride_xm, stride_xk, RS, WS, W1, s_w1n, s_w1k, N1, t1, CT1, pid_n - nb0, N0,
                             M, K, N_TOTAL, HAS_ROW_SCALE, HAS_CT1, M_PAD, BLOCK_N, BLOCK_K, TILES, DOT_PRECISION,
                             W_EVICT, SKIP_EMPTY)
            if ACT != "":  # up: the gate block of the same columns owns the counter and the output
                _elect_finish(WS, CNT, pid_n - nb0, 2 * nk, Y0, B0, N0, 0, pid_n - nb0, M, N_TOTAL, False, ACT,
                              M_PAD, BLOCK_N)
            else:
                _elect_finish(WS, CNT, pid_n, nk, Y1, B1, N1, N0, pid_n - nb0, M, N_TOTAL, HAS_B1, "", M_PAD,
                              BLOCK_N)
        elif NUM_OUT >= 3:
            _predicated_tile(X, stride_xm, stride_xk, RS, WS, W2, s_w2n, s_w2k, N2, t2, CT2, pid_n - nb0 - nb1,
                             N0 + N1, M, K, N_TOTAL, HAS_ROW_SCALE, HAS_CT2, M_PAD, BLOCK_N, BLOCK_K, TILES,
                             DOT_PRECISION, W_EVICT, SKIP_EMPTY)
            _elect_finish(WS, CNT, pid_n, nk, Y2, B2, N2, N0 + N1, pid_n - nb0 - nb1, M, N_TOTAL, HAS_B2, "",
                          M_PAD, BLOCK_N)


@triton.jit
def _finish_block(WS, Y, B, N, col0, blk, m, N_TOTAL, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    ws = WS + m * N_TOTAL + col0 + offs
    tot = tl.load(ws, mask=ok, other=0.0, cache_modifier=".cg")
    tl.debug_barrier()  # every thread has read its sums before any is reset (a layout may replicate)
    tl.store(ws, tl.zeros([BLOCK], dtype=tl.float32), mask=ok)
    if HAS_BIAS:
        tot += tl.load(B + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + m * N + offs, tot.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _finish_kernel(WS, Y0, Y1, Y2, B0, B1, B2, N0, N1, N2, N_TOTAL,
                   NUM_OUT: tl.constexpr, HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Grid: (blocks of all outputs, rows). y = workspace + bias in y's dtype; workspace = 0."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    nb0 = tl.cdiv(N0, BLOCK)
    nb1 = tl.cdiv(N1, BLOCK)
    if pid < nb0:
        _finish_block(WS, Y0, B0, N0, 0, pid, m, N_TOTAL, HAS_B0, BLOCK)
    elif NUM_OUT >= 2:
        if pid < nb0 + nb1:
            _finish_block(WS, Y1, B1, N1, N0, pid - nb0, m, N_TOTAL, HAS_B1, BLOCK)
        elif NUM_OUT >= 3:
            _finish_block(WS, Y2, B2, N2, N0 + N1, pid - nb0 - nb1, m, N_TOTAL, HAS_B2, BLOCK)


@triton.jit
def _finish_gated_kernel(WS, H, N, N_TOTAL, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Grid: (blocks of N, rows). The gated MLP's product from the two outputs' sums,
    h = act(gate) * up, in h's dtype; workspace = 0. Writes h instead of gate and up, so the
    product needs no launch of its own."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.program_id(1)
    ok = offs < N
    ws = WS + m * N_TOTAL + offs
    g = tl.load(ws, mask=ok, other=0.0, cache_modifier=".cg")
    u = tl.load(ws + N, mask=ok, other=0.0, cache_modifier=".cg")
    tl.debug_barrier()
    tl.store(ws, tl.zeros([BLOCK], dtype=tl.float32), mask=ok)
    tl.store(ws + N, tl.zeros([BLOCK], dtype=tl.float32), mask=ok)
    tl.store(H + m * N + offs, (_activation(g, ACT) * u).to(H.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Configs and autotuning
# ----------------------------------------------------------------------------------------------


def _cfg(block_k, block_n, tiles, warps, evict="", skip=True):
    return triton.Config(dict(BLOCK_K=block_k, BLOCK_N=block_n, TILES=tiles, W_EVICT=evict, SKIP_EMPTY=skip),
                         num_warps=warps, num_stages=1)


#: One row: TEAL's range of tile shapes (one tile per program, many programs) and a few
#: programs that unroll several tiles (fewer partial sums to add, the same loads in flight).
CONFIGS_M1 = [
    _cfg(16, 256, 1, 4), _cfg(32, 256, 1, 4), _cfg(64, 256, 1, 4), _cfg(16, 512, 1, 4), _cfg(32, 512, 1, 4),
    _cfg(8, 128, 1, 2), _cfg(64, 128, 1, 2), _cfg(128, 64, 1, 4), _cfg(128, 128, 1, 4),
    _cfg(16, 256, 4, 4), _cfg(32, 256, 2, 4), _cfg(16, 512, 2, 4), _cfg(32, 128, 4, 2),
    _cfg(16, 256, 1, 4, "evict_first"), _cfg(32, 256, 2, 4, "evict_first"),
    _cfg(16, 256, 1, 4, skip=False), _cfg(32, 256, 2, 4, skip=False),  # no emptiness test (low sparsity)
]
#: 2..16 rows padded to 16 (tl.dot needs BLOCK_K >= 16).
CONFIGS_DOT = [
    _cfg(32, 128, 1, 4), _cfg(32, 256, 1, 4), _cfg(64, 128, 1, 4), _cfg(16, 128, 2, 4), _cfg(32, 64, 2, 4),
    _cfg(16, 256, 4, 8),
]
#: Used in the interpreter unless a test passes its own.
INTERPRET_CONFIG = dict(BLOCK_K=16, BLOCK_N=32, TILES=2, num_warps=4)
#: Outputs per program of the finishing launch.
FINISH_BLOCK = 512


def _prune(configs, named_args, **kwargs):
    """Drop configs whose tiles are much larger than the problem."""
    k, n = named_args["K"], named_args["N_TOTAL"]
    keep = [c for c in configs if c.kwargs["BLOCK_K"] * c.kwargs["TILES"] <= max(2 * k, 64)
            and c.kwargs["BLOCK_N"] <= max(2 * n, 64)]
    return keep or configs[:1]


_TUNERS: dict[tuple[int, bool], object] = {}
#: Smallest BLOCK_N of any config (the elect variant's counters are sized by it).
MIN_BLOCK_N = 16


def _tuned_kernel(m_pad: int, elect: bool = False):
    if (m_pad, elect) not in _TUNERS:
        configs = CONFIGS_M1 if m_pad == 1 else CONFIGS_DOT
        key = ["K", "N_TOTAL", "N0", "NUM_OUT", "M_BUCKET", "SPARSITY_KEY", "DEVICE_KEY"]
        kernel = _predicated_elect_kernel if elect else _predicated_kernel
        _TUNERS[m_pad, elect] = rt.autotune(configs, key, prune=_prune)(kernel)
    return _TUNERS[m_pad, elect]


def counters(ns: Sequence[int]) -> int:
    """Counters the elect variant needs for outputs of widths ``ns`` (one per smallest block)."""
    return sum(triton.cdiv(int(n), MIN_BLOCK_N) for n in ns)


def check_config(config: dict, m_pad: int) -> None:
    """A pinned config must fit the kernel: the dot path needs tiles of at least 16 channels."""
    missing = {"BLOCK_K", "BLOCK_N", "TILES"} - set(config)
    if missing:
        raise ValueError(f"predicated config needs {sorted(missing)}, got {sorted(config)}")
    if config["BLOCK_N"] < MIN_BLOCK_N:
        raise ValueError(f"predicated configs need BLOCK_N >= {MIN_BLOCK_N}, got {config['BLOCK_N']}")
    if m_pad > 1 and config["BLOCK_K"] < 16:
        raise ValueError(f"batches of 2..16 rows need BLOCK_K >= 16 (tl.dot), got {config['BLOCK_K']}")


def launch(common: dict, ns: Sequence[int], m: int, m_pad: int, config: dict | None = None,
           elect: bool = False) -> None:
    """Run the family on the arguments ``sparse_gemv.launch_sparse_linear`` prepared.

    ``common`` holds the padded per-output lists (W, B, Y, CT, T, N, strides) and the scalars.
    ``elect``: the variant without a finishing launch (``cnt``: its zeroed counters).
    """
    c = common
    if elect:
        cnt = rt.zeroed_buffer("pcnt", counters(ns), torch.int32, c["x"].device)
        Y = [c["h"], c["h"], c["h"]] if c.get("epilogue") else c["Y"]
        args = [c["x"], c["rs"], c["ws"], cnt, *c["W"], *c["CT"], *c["B"], *Y, *c["T"], *c["N"], *c["strides"],
                c["x"].stride(0), c["x"].stride(1), m, c["K"], c["n_total"], *c["key"]]
    else:
        args = [c["x"], c["rs"], c["ws"], *c["W"], *c["CT"], *c["T"], *c["N"], *c["strides"],
                c["x"].stride(0), c["x"].stride(1), m, c["K"], c["n_total"], *c["key"]]
    meta = dict(NUM_OUT=c["num_out"], HAS_ROW_SCALE=c["has_rs"], M_PAD=m_pad, DOT_PRECISION=c["dot_precision"],
                HAS_CT0=c["has_ct"][0], HAS_CT1=c["has_ct"][1], HAS_CT2=c["has_ct"][2])
    if elect:
        has_b = c["has_b"]
        meta.update(HAS_B0=has_b[0], HAS_B1=has_b[1], HAS_B2=has_b[2], ACT=c.get("epilogue") or "")

    def grid(meta_):
        bn = meta_["BLOCK_N"]
        return (sum(triton.cdiv(n, bn) for n in ns), triton.cdiv(c["K"], meta_["BLOCK_K"] * meta_["TILES"]))

    if config is None and rt.interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        check_config(config, m_pad)
        kw = {**meta, **config}
        (_predicated_elect_kernel if elect else _predicated_kernel)[grid(kw)](*args, **kw)
    else:
        _tuned_kernel(m_pad, elect)[grid](*args, **meta)
    if elect:
        return
    if c.get("epilogue"):  # gate and up: write act(gate) * up only
        _finish_gated_kernel[(triton.cdiv(ns[0], FINISH_BLOCK), m)](
            c["ws"], c["h"], ns[0], c["n_total"], ACT=c["epilogue"], BLOCK=FINISH_BLOCK, num_warps=4)
        return
    Y, B, has_b = c["Y"], c["B"], c["has_b"]
    fin_grid = (sum(triton.cdiv(n, FINISH_BLOCK) for n in ns), m)
    _finish_kernel[fin_grid](c["ws"], *Y, *B, *c["N"], c["n_total"], NUM_OUT=c["num_out"], HAS_B0=has_b[0],
                             HAS_B1=has_b[1], HAS_B2=has_b[2], BLOCK=FINISH_BLOCK, num_warps=4)
