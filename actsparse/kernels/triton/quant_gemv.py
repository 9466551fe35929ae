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
   group (BLOCK_K divides G; grouped int8 too), so the group's scales and offsets are loaded
   once per step, and only if some channel of the step is active; each channel is skipped on
   its own (granularity: one input channel, N / 2 bytes). The low nibbles feed outputs [j],
   the high ones outputs [j + N / 2]: two accumulators, no interleaving.
   ONE_GROUP configs (grouped weights; a program's CHUNK inside one group) accumulate the raw
   integers and apply the group's scale once per program: ``s * sum(x q) + z * sum(x)``, so
   the inner loop is a conversion and an FMA per weight.
3. One row (M = 1): fp32 FMAs, reduced over k once at the end. 2..16 rows: the rows padded to 16
   and one ``tl.dot`` per step (the weight tile cast to x's dtype; fp32 inputs stay fp32).
   UNROLL configs unroll the CHUNK loop so every step's loads are in flight at once (the
   predicated family's reason); the others loop, with fewer registers.
   COMPACT configs first turn the chunk's mask into a list of its active channels (a prefix
   sum, through a small scratch buffer, as the bf16 kernel's compacted family does) and walk
   that list: the predicated loop converts and multiplies every channel, active or not, so
   it is bound by arithmetic (int4 most: its time hardly moved with sparsity); the list's
   loop does the arithmetic of the active channels only. On grouped weights they need
   ONE_GROUP (a list's step mixes channels from anywhere in the chunk).
   FRAC configs (one row; int8 with per-output scales, or ONE_GROUP) build the float
   1 + u / 2^bits from a code u with a shift and one logic op (u in the top of the mantissa
   of 1.0) and remove the 1 once per program from sum(x): no conversion, no subtraction per
   weight. It costs 8 of fp32's 24 bits (int8), so fp32 x is never tuned onto it.
4. The partial sums are added with relaxed fp32 atomics to a cached zeroed workspace; the
   predicated family's finishing launch adds the bias, writes y in x's dtype and re-zeroes the
   workspace (two launches per call; CUDA-graph safe, no host sync).
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Optional

import torch

import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from actsparse.kernels.triton import _runtime as rt
from actsparse.kernels.triton.predicated_gemv import FINISH_BLOCK, _finish_kernel
from actsparse.kernels.triton.sparse_gemv import _chunk_union, _row_cutoffs


@triton.jit
def _int_to_f32(v, FAST_CVT: tl.constexpr):
    """int32 values in [0, 2^23) to fp32, exactly. FAST_CVT: OR them into the mantissa of 2^23
    and subtract 2^23 (a logic op and an add at full rate, where the conversion instruction issues
    at a fraction of the FMA rate)."""
    if FAST_CVT:
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        return v.to(tl.float32)


@triton.jit
def _frac_to_f32(qi, BITS: tl.constexpr, HI: tl.constexpr):
    """The code u (int8: q + 128; int4: one nibble) as the float 1 + u / 2^BITS: shifted into the
    top of an fp32 mantissa under the exponent of 1.0 (a shift and one logic op, no conversion
    and no subtraction). The constant 1 per weight is removed once per program: sum(x) is kept."""
    if BITS == 8:  # bits 0..7 to 15..22, bit 7 flipped (q + 128), exponent of 1.0 set: one XOR
        v = ((qi << 15) & 0x7F8000) ^ 0x3FC00000
    elif HI:  # bits 4..7 to 19..22
        v = ((qi << 15) & 0x780000) | 0x3F800000
    else:  # bits 0..3 to 19..22
        v = ((qi << 19) & 0x780000) | 0x3F800000
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _quant_step(X, Q, S, Z, stride_xm, stride_xk, stride_qk, offs_m, m_ok, cutoff, offs_c, c_ok, rows, valid,
                grp, N, NC, acc, acc_hi, xsum, cnt,
                BITS: tl.constexpr, GROUPED: tl.constexpr, ONE_GROUP: tl.constexpr, M_PAD: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, FAST_CVT: tl.constexpr,
                UNION_KNOWN: tl.constexpr, FRAC: tl.constexpr):
    """BLOCK_K input channels ``rows`` (``valid`` ones in range): load x, predicate the weight rows
    on the union of the rows' masks (UNION_KNOWN: ``valid`` is that union, a compacted list),
    accumulate. ONE_GROUP: the program's channels lie in one group, so the raw integers are
    accumulated here and the group's scales (and offsets) applied once, at the end. ``grp``: the
    step's group (steps never straddle one)."""
    xg = tl.load(X + offs_m[:, None] * stride_xm + rows[None, :] * stride_xk,
                 mask=m_ok[:, None] & valid[None, :], other=0.0)  # [M_PAD, BLOCK_K]
    keep = (tl.abs(xg.to(tl.float32)) > cutoff[:, None]) & m_ok[:, None] & valid[None, :]
    if UNION_KNOWN:
        on = valid
    else:
        on = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: some row needs the channel
        cnt += tl.sum(on.to(tl.int32), axis=0)
    q = tl.load(Q + rows[:, None] * stride_qk + offs_c[None, :], mask=on[:, None] & c_ok[None, :], other=0)
    qi = q.to(tl.int32)
    if FRAC:  # one row; int8 per-output scales or ONE_GROUP: the 1 per weight is taken out at the end
        w = _frac_to_f32(qi, BITS, False)
        if BITS == 4:
            w_hi = _frac_to_f32(qi, BITS, True)
        else:
            w_hi = w
    else:
        if BITS == 8:
            qf = _int_to_f32(qi + 128, FAST_CVT) - 128.0  # int8 -128..127, shifted into 0..255 and back
        else:  # uint8 holding two nibbles
            qf = _int_to_f32(qi & 0xF, FAST_CVT)
            qf_hi = _int_to_f32((qi >> 4) & 0xF, FAST_CVT)
        if BITS == 8 and GROUPED and not ONE_GROUP:
            n_on = tl.zeros([BLOCK_N], dtype=tl.int32) + tl.max(on.to(tl.int32), axis=0)
            g_s = tl.load(S + grp * N + offs_c, mask=c_ok & (n_on > 0), other=0.0).to(tl.float32)
            w = qf * g_s[None, :]
            w_hi = w
        elif BITS == 8:
            w = qf
            w_hi = w
        elif ONE_GROUP:
            w = qf
            w_hi = qf_hi
        else:
            n_on = tl.zeros([BLOCK_N], dtype=tl.int32) + tl.max(on.to(tl.int32), axis=0)
            g_ok = c_ok & (n_on > 0)  # the group's scales are read only if one of its channels is
            s_lo = tl.load(S + grp * N + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            s_hi = tl.load(S + grp * N + NC + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            z_lo = tl.load(Z + grp * N + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            z_hi = tl.load(Z + grp * N + NC + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            w = qf * s_lo[None, :] + z_lo[None, :]
            w_hi = qf_hi * s_hi[None, :] + z_hi[None, :]
    if M_PAD == 1:
        xv = tl.sum(tl.where(keep, xg.to(tl.float32), 0.0), axis=0)  # [BLOCK_K]
        acc += xv[:, None] * w
        if BITS == 4:
            acc_hi += xv[:, None] * w_hi
        if FRAC or (BITS == 4 and ONE_GROUP):
            xsum += xv
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
        if BITS == 4 and ONE_GROUP:
            xsum += tl.sum(xm.to(tl.float32), axis=1)
    return acc, acc_hi, xsum, cnt


@triton.jit
def _quant_gemv_kernel(
    X, RS, Q, S, Z, Y, SCR, thr,
    M, K, NC, N, G,
    stride_xm, stride_xk, stride_qk,
    KEY_M, KEY_BITS, KEY_S, KEY_DEV,  # only for the autotune key
    BITS: tl.constexpr, GROUPED: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, M_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr, ONE_GROUP: tl.constexpr,
    FAST_CVT: tl.constexpr, COMPACT: tl.constexpr, FRAC: tl.constexpr,
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
        xsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        acc_hi = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([M_PAD], dtype=tl.float32)
    cnt = tl.sum(tl.zeros([BLOCK_K], dtype=tl.int32), axis=0)

    k0 = pid_k * CHUNK
    offs_j = tl.arange(0, BLOCK_K)
    if COMPACT:
        # The chunk's channels some row needs, as a dense list (prefix sum; written to scratch and
        # read back after a barrier; every program of the chunk writes the same list), so the
        # loop, its conversions and its FMAs run over active channels only.
        offs_cc = tl.arange(0, CHUNK)
        active = _chunk_union(X, stride_xm, stride_xk, RS, thr, X, k0, K, M, CHUNK, M_PAD, HAS_ROW_SCALE, False)
        pos = tl.cumsum(active, axis=0) - 1
        n_act = tl.sum(active, axis=0)
        tl.store(SCR + k0 + pos, offs_cc, mask=active > 0)
        tl.debug_barrier()  # the list is written by all threads, read back by all threads
        cnt += n_act
        for j in range(0, n_act, BLOCK_K):
            valid = (j + offs_j) < n_act
            idx = tl.load(SCR + k0 + j + offs_j, mask=valid, other=0)
            acc, acc_hi, xsum, cnt = _quant_step(
                X, Q, S, Z, stride_xm, stride_xk, stride_qk, offs_m, m_ok, cutoff, offs_c, c_ok, k0 + idx, valid,
                k0 // tl.maximum(G, 1), N, NC, acc, acc_hi, xsum, cnt, BITS, GROUPED, ONE_GROUP, M_PAD,
                DOT_PRECISION, BLOCK_N, FAST_CVT, True, FRAC)
    elif UNROLL:  # every step's loads can be in flight at once (none depends on another step)
        for kb in tl.static_range(0, CHUNK, BLOCK_K):
            rows = k0 + kb + offs_j
            acc, acc_hi, xsum, cnt = _quant_step(
                X, Q, S, Z, stride_xm, stride_xk, stride_qk, offs_m, m_ok, cutoff, offs_c, c_ok, rows, rows < K,
                (k0 + kb) // tl.maximum(G, 1), N, NC, acc, acc_hi, xsum, cnt, BITS, GROUPED, ONE_GROUP, M_PAD,
                DOT_PRECISION, BLOCK_N, FAST_CVT, False, FRAC)
    else:
        for kb in range(0, CHUNK, BLOCK_K):
            rows = k0 + kb + offs_j
            acc, acc_hi, xsum, cnt = _quant_step(
                X, Q, S, Z, stride_xm, stride_xk, stride_qk, offs_m, m_ok, cutoff, offs_c, c_ok, rows, rows < K,
                (k0 + kb) // tl.maximum(G, 1), N, NC, acc, acc_hi, xsum, cnt, BITS, GROUPED, ONE_GROUP, M_PAD,
                DOT_PRECISION, BLOCK_N, FAST_CVT, False, FRAC)

    if M_PAD == 1:
        part = tl.sum(acc, axis=0)[None, :]
        part_hi = tl.sum(acc_hi, axis=0)[None, :]
        xs = tl.zeros([M_PAD], dtype=tl.float32) + tl.sum(xsum, axis=0)
    else:
        part = acc
        part_hi = acc_hi
        xs = xsum
    # FRAC (one row, and only where the constant is removable once per program: the launcher
    # and config_fits see to both): sums of x * (1 + u / 2^BITS) back to sums of x * code
    if FRAC:
        if BITS == 8:  # u = q + 128
            part = 256.0 * (part - xs[:, None]) - 128.0 * xs[:, None]
        else:
            part = 16.0 * (part - xs[:, None])
            part_hi = 16.0 * (part_hi - xs[:, None])
    out_ok = m_ok[:, None] & c_ok[None, :]
    if BITS == 8 and not GROUPED:
        s = tl.load(S + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        part = part * s[None, :]
    elif ONE_GROUP:  # the chunk's one group: its scales, read only if one of its channels is active
        grp = k0 // G
        g_ok = c_ok & ((tl.zeros([BLOCK_N], dtype=tl.int32) + cnt) > 0)
        s_lo = tl.load(S + grp * N + offs_c, mask=g_ok, other=0.0).to(tl.float32)
        part = part * s_lo[None, :]
        if BITS == 4:
            s_hi = tl.load(S + grp * N + NC + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            z_lo = tl.load(Z + grp * N + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            z_hi = tl.load(Z + grp * N + NC + offs_c, mask=g_ok, other=0.0).to(tl.float32)
            part = part + xs[:, None] * z_lo[None, :]
            part_hi = part_hi * s_hi[None, :] + xs[:, None] * z_hi[None, :]
    tl.atomic_add(Y + offs_m[:, None] * N + offs_c[None, :], part, mask=out_ok, sem="relaxed")
    if BITS == 4:
        tl.atomic_add(Y + offs_m[:, None] * N + NC + offs_c[None, :], part_hi, mask=out_ok, sem="relaxed")


def _cfg(block_n, block_k, chunk, warps, unroll=False, one_group=False, compact=False, frac=False):
    return triton.Config(dict(BLOCK_N=block_n, BLOCK_K=block_k, CHUNK=chunk, UNROLL=unroll, ONE_GROUP=one_group,
                              FAST_CVT=unroll, COMPACT=compact, FRAC=frac),
                         num_warps=warps, num_stages=1 if unroll or compact else 3)


#: One row. The first six loop over the chunk (few programs' worth of loads in flight); the
#: unrolled ones issue every step's loads at once, with wider column blocks since a byte column
#: is one output (int8) or two (int4), and convert integers without the conversion unit
#: (FAST_CVT); the ONE_GROUP ones (grouped weights, a chunk inside one group) apply the group's
#: scales once per program instead of per weight. The COMPACT ones walk a list of the chunk's
#: active channels, so their conversions and FMAs shrink with the sparsity (the predicated loop
#: converts and multiplies every channel, which bounds it by arithmetic, int4 most); FRAC ones
#: turn a code into a float with a shift and a logic op.
CONFIGS_M1 = [_cfg(128, 32, 256, 4), _cfg(256, 16, 256, 4), _cfg(64, 32, 512, 4), _cfg(128, 32, 1024, 4),
              _cfg(256, 32, 512, 8), _cfg(128, 16, 128, 4),
              _cfg(512, 16, 64, 8, True), _cfg(256, 16, 64, 4, True), _cfg(512, 16, 32, 4, True),
              _cfg(256, 32, 128, 8, True), _cfg(1024, 16, 32, 8, True), _cfg(256, 16, 128, 4, True),
              _cfg(256, 16, 64, 4, True, True), _cfg(512, 16, 64, 8, True, True), _cfg(256, 32, 128, 8, True, True),
              _cfg(512, 16, 128, 8, True, True), _cfg(256, 16, 32, 4, True, True),
              _cfg(256, 16, 64, 4, True, True, frac=True), _cfg(512, 16, 64, 8, True, frac=True),
              _cfg(256, 16, 256, 4, compact=True), _cfg(256, 16, 256, 4, compact=True, frac=True),
              _cfg(512, 16, 256, 8, compact=True, frac=True), _cfg(128, 32, 256, 4, compact=True, frac=True),
              _cfg(256, 16, 512, 4, compact=True, frac=True), _cfg(256, 32, 128, 8, compact=True, frac=True),
              _cfg(256, 16, 128, 4, one_group=True, compact=True, frac=True),
              _cfg(512, 16, 128, 8, one_group=True, compact=True, frac=True),
              _cfg(256, 16, 64, 4, one_group=True, compact=True, frac=True),
              _cfg(256, 32, 128, 8, one_group=True, compact=True, frac=True)]
CONFIGS_DOT = [_cfg(64, 32, 256, 4), _cfg(128, 32, 512, 4), _cfg(128, 16, 256, 4), _cfg(256, 32, 512, 8),
               _cfg(128, 16, 64, 4, True), _cfg(256, 16, 64, 8, True), _cfg(128, 32, 128, 4, True),
               _cfg(128, 16, 64, 4, True, True), _cfg(256, 16, 64, 8, True, True), _cfg(128, 32, 128, 8, True, True),
               _cfg(128, 32, 256, 4, compact=True), _cfg(128, 16, 128, 4, one_group=True, compact=True)]
#: The interpreter's config (no autotuning there) unless a test passes its own.
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, num_warps=4)
#: Defaults of the config keys a pinned config may leave out.
CONFIG_DEFAULTS = dict(UNROLL=False, ONE_GROUP=False, FAST_CVT=False, COMPACT=False, FRAC=False)


def config_fits(cfg: dict, group_size: int) -> bool:
    """A step may not straddle a group; a ONE_GROUP chunk must lie inside one (grouped weights
    only). On grouped weights a compacted list (whose steps mix channels from anywhere in the
    chunk) and the FRAC conversion (whose constant is removed once per program) need ONE_GROUP."""
    if group_size and group_size % cfg["BLOCK_K"]:
        return False
    if cfg.get("ONE_GROUP"):
        return bool(group_size) and group_size % cfg["CHUNK"] == 0
    if group_size and (cfg.get("COMPACT") or cfg.get("FRAC")):
        return False
    return True


def _prune(configs, named_args, **kwargs):
    """Drop configs much larger than the problem, and those that do not fit its groups. fp32 x
    keeps its full precision: FRAC spends 8 of fp32's 24 bits on the constant it removes."""
    k, nc, g = named_args["K"], named_args["NC"], named_args["G"]
    x = named_args.get("X")
    fp32 = getattr(x, "dtype", None) == torch.float32
    keep = [c for c in configs if c.kwargs["CHUNK"] <= max(2 * k, 128) and c.kwargs["BLOCK_N"] <= max(2 * nc, 64)
            and config_fits(c.kwargs, g) and not (fp32 and c.kwargs.get("FRAC"))]
    return keep or [c for c in configs if config_fits(c.kwargs, g)][-1:]


#: Config sets the autotuner may be held to (benchmarks compare them in one run): "all"; the
#: predicated loops with the older conversions; the compacted lists.
CONFIG_SETS = {"all": lambda kw: True,
               "predicated": lambda kw: not kw["COMPACT"] and not kw["FRAC"],
               "compact": lambda kw: kw["COMPACT"]}
_CONFIG_SET = "all"
_TUNERS: dict[tuple, object] = {}


@contextmanager
def config_set(name: str):
    """Tune (and run) the calls of the block over one of ``CONFIG_SETS`` only."""
    global _CONFIG_SET
    if name not in CONFIG_SETS:
        raise ValueError(f"unknown config set {name!r}; expected one of {sorted(CONFIG_SETS)}")
    prev, _CONFIG_SET = _CONFIG_SET, name
    try:
        yield
    finally:
        _CONFIG_SET = prev


def _tuned(m_pad: int):
    key = (m_pad, _CONFIG_SET)
    if key not in _TUNERS:
        configs = [c for c in (CONFIGS_M1 if m_pad == 1 else CONFIGS_DOT) if CONFIG_SETS[_CONFIG_SET](c.kwargs)]
        kwargs = dict(configs=configs,
                      key=["K", "NC", "G", "KEY_M", "KEY_BITS", "KEY_S", "KEY_DEV"],
                      reset_to_zero=["Y"], do_bench=rt.autotune_bench, cache_results=True,
                      prune_configs_by={"early_config_prune": _prune})
        accepted = inspect.signature(triton.autotune).parameters
        _TUNERS[key] = triton.autotune(**{k: v for k, v in kwargs.items() if k in accepted})(_quant_gemv_kernel)
    return _TUNERS[key]


#: Config sets one of whose configs this process's Triton failed to compile: their calls run on
#: the predicated set instead (the interpreter, where the tests run, compiles nothing).
FAILED_SETS: set[str] = set()


def _run_tuned(m_pad: int, grid, args: list, meta: dict) -> None:
    name = "predicated" if _CONFIG_SET in FAILED_SETS else _CONFIG_SET
    try:
        with config_set(name):
            _tuned(m_pad)[grid](*args, **meta)
    except CompilationError as e:
        if name == "predicated":
            raise
        FAILED_SETS.add(name)
        warnings.warn(f"quant_gemv: a config of the {name!r} set does not compile with Triton {triton.__version__} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); this process uses the "
                      "'predicated' configs instead", RuntimeWarning, stacklevel=3)
        with config_set("predicated"):  # the autotuner zeroes the workspace before its final run
            _tuned(m_pad)[grid](*args, **meta)


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
    n_ws = M * n
    ws = rt.zeroed_buffer("quant_gemv", n_ws, torch.float32, x.device)  # the finishing launch re-zeroes it
    rs = None
    if row_scale is not None:
        rs = row_scale.reshape(-1).to(torch.float32).contiguous()
        assert rs.numel() == M
    m_pad = rows_pad(M)
    scr = rt.scratch_buffer("quant_idx", K, torch.int32, x.device)  # compacted lists (COMPACT configs)
    args = [x, rs if rs is not None else ws, qweight, scales, offsets if offsets is not None else scales, ws, scr,
            float(threshold), M, K, nc, n, group_size, x.stride(0), x.stride(1), qweight.stride(0),
            m_pad, bits + (100 if group_size else 0), rt.sparsity_bucket(sparsity_hint), rt.device_key(x.device)]
    meta = dict(BITS=bits, GROUPED=group_size > 0, HAS_ROW_SCALE=rs is not None, M_PAD=m_pad, DOT_PRECISION=rt.dot_precision(x.dtype))

    def grid(meta_):
        return (triton.cdiv(nc, meta_["BLOCK_N"]), triton.cdiv(K, meta_["CHUNK"]))

    if config is None and rt.interpreting():
        config = INTERPRET_CONFIG
    if config is not None:
        cfg = {**CONFIG_DEFAULTS, **config}
        if m_pad > 1:  # FRAC is a one-row conversion: the dot path converts codes as they are
            cfg["FRAC"] = False
        if not config_fits(cfg, group_size):
            raise ValueError(f"config {config} does not fit group size {group_size}: BLOCK_K must divide the "
                             "group, a ONE_GROUP chunk must lie inside one, and on grouped weights COMPACT and "
                             "FRAC need ONE_GROUP")
        _quant_gemv_kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        _run_tuned(m_pad, grid, args, meta)
    y = torch.empty((M, n), dtype=x.dtype, device=x.device)
    finish = (triton.cdiv(n, FINISH_BLOCK), M)
    _finish_kernel[finish](ws, y, y, y, bias if bias is not None else ws, ws, ws, n, 0, 0, n, NUM_OUT=1,
                           HAS_B0=bias is not None, HAS_B1=False, HAS_B2=False, BLOCK=FINISH_BLOCK, num_warps=4)
    return y


def reserve_buffers(device: torch.device, n: int, max_rows: int = rt.MAX_ROWS, k: Optional[int] = None) -> None:
    """Allocate the cached workspace for outputs of width ``n``, outside any CUDA-graph pool.

    Same reason as the bf16 kernel's: a cached buffer first allocated during a CUDA-graph
    tree's warm-up would live in the tree's private pool without being a graph output. ``k``
    (the input width) reserves the compacted-list scratch too.
    """
    rt.zeroed_buffer("quant_gemv", max_rows * int(n), torch.float32, device)
    if k is not None:
        rt.scratch_buffer("quant_idx", int(k), torch.int32, device)
