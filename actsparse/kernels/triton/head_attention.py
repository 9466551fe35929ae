"""Head-sparse flash-decoding in Triton: attention for the selected heads only, 0 for the rest.

Why it is fast
--------------
Decoding attention reads the whole KV cache once per token, so at large batch and long context
its time is the bytes of K and V. Each sequence selects a few attention *units* (Polar
Sparsity's selective heads): a unit is `heads_per_unit` consecutive query heads, either a whole
KV group (all query heads sharing one KV head) or a single query head. Only the selected units'
K/V rows are read; the grid has no program for an unselected unit, and the unselected heads'
outputs are written as zeros by the small combine kernel.

Two launches:

1. `_split_kernel`, grid (B * n_sel, n_splits): one program per (sequence, selected unit,
   split of the context). It loads the unit's `heads_per_unit` query rows once, then walks its
   blocks of BLOCK_S positions with the online softmax (running max m, running sum l, fp32
   accumulator; exp2 with the scale folded into log2 units). For each block the mask is loaded
   first, and K/V rows are loaded only for positions some head of the unit attends: a block
   nobody attends moves no K/V bytes. It writes unnormalised partials (acc, m, l) to an fp32
   workspace allocated per call.
2. `_combine_kernel`, grid (B * n_units,): one program per (sequence, unit), selected or not.
   It finds the unit's slot in its row of `unit_idx` (a compare over n_sel integers), merges
   the splits' partials with the usual rescaling and writes out = acc / l. For an unselected
   unit every load is predicated off, so the same code writes zeros: every output element is
   written exactly once, by one kernel, and no memset launch is needed.

Splitting the context (flash-decoding) keeps the GPU busy when B * n_sel programs would be
too few for the SMs; `choose_splits` picks the split count on the host from static shapes only
(no host synchronisation, no data-dependent shapes: safe inside CUDA graph capture).

Attended span (TRIM, with a mask): a static cache of 16k slots holding 4k tokens would still
give every split its share of the 16k slots, and 3/4 of the programs would find nothing to
read. So each program first scans the mask alone (SCAN_BLOCK positions per step, a few KiB
per step) for the first and last attended position of its unit: TRIM=2 (default) scans the
whole row and deals the attended span's blocks out among the splits, so all splits share the
real tokens; TRIM=1 scans only the program's own run and cuts it to its attended part; TRIM=0
walks every block. The span is computed on the GPU; the grid stays static.

Query rows: the unit's heads share one K/V block. USE_DOT=True pads them to at least 16 rows
and uses `tl.dot` (tensor cores; Triton pipelines the K/V loads of this loop into shared
memory with cp.async); USE_DOT=False multiplies and sums in fp32 registers: no padding to 16
rows and no layout conversion, suited to one or two rows, but Triton does not pipeline loads
that feed no dot, so it relies on occupancy. Both are autotuned.

Blocks inside the span that nobody attends (holes): SKIP_BRANCH=False predicates the K/V loads
only and keeps the loop body straight (pipelined); SKIP_BRANCH=True also branches around the
block's math, which Triton does not pipeline. Both move the same bytes; the autotuner chooses.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

import triton
import triton.language as tl

from actsparse.kernels.triton import _runtime as rt

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_HEADS_PER_UNIT = 64

#: Positions per split at the least: below this a program spends more time on its prologue
#: (q load) and epilogue (partials) than on streaming K/V.
MIN_SPLIT_LEN = 256
#: Programs per SM the split count aims for: enough to hide memory latency and the tail of the
#: last wave, few enough that each split stays long.
PROGRAMS_PER_SM = 3
MAX_SPLITS = 64
#: Mask elements per step of the attended-span scan (TRIM): one 4 KiB bool row per step.
SCAN_ELEMS = 4096
#: SM count assumed under the interpreter (no GPU): small, so default launches stay small.
INTERPRET_SMS = 2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attend_block(q, k_base, v_base, sks, skd, svs, svd, offs_s, offs_d, offs_e,
                  pos_ok, valid, bias, m_i, l_i, acc, qk_scale,
                  HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of the online softmax. K/V rows are loaded only where `pos_ok` (some head of
    the unit attends the position); `valid` [R, BLOCK_S] says which (head, position) pairs
    take part. Scores are in log2 units; a row with nothing valid so far keeps m = -inf."""
    k = tl.load(k_base + offs_s[:, None] * sks + offs_d[None, :] * skd, mask=pos_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_s[:, None] * svs + offs_e[None, :] * svd, mask=pos_ok[:, None], other=0.0)
    if USE_DOT:
        if DOT_PRECISION == "upcast":  # Triton's CPU interpreter gets bf16 dots wrong
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    qk = qk * qk_scale
    if HAS_BIAS:
        qk += bias * 1.4426950408889634  # the additive mask, in log2 units
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no NaN from (-inf) - (-inf)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if USE_DOT:
        if DOT_PRECISION == "upcast":
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:  # p rounded to the input dtype for the tensor cores, as flash attention does
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _mask_tile(mask_base, offs_r, row_ok, offs_s, in_rng, smh, sms, mask_min,
               MASK_KIND: tl.constexpr, MASK_PER_HEAD: tl.constexpr):
    """valid [R, N] (head r attends position s) and the additive bias ([R or 1, N], fp32, 0
    where masked out) of one tile of the mask."""
    if MASK_PER_HEAD:
        mv = tl.load(mask_base + offs_r[:, None] * smh + offs_s[None, :] * sms,
                     mask=row_ok[:, None] & in_rng[None, :], other=0)  # [R, N]
    else:  # one mask row shared by every head (head stride 0): load it once
        mv = tl.load(mask_base + offs_s * sms, mask=in_rng, other=0)[None, :]  # [1, N]
    if MASK_KIND == 1:
        attends = mv != 0
        bias = 0.0
    else:  # additive: at or below the dtype's minimum (incl. -inf) means masked out
        bias = mv.to(tl.float32)
        attends = bias > mask_min
        bias = tl.where(attends, bias, 0.0)  # masked-out values never enter a product
    valid = attends & row_ok[:, None] & in_rng[None, :]
    return valid, bias


@triton.jit
def _attended_span(mask_base, smh, sms, mask_min, lo, hi, HPU: tl.constexpr, ROWS: tl.constexpr,
                   MASK_KIND: tl.constexpr, MASK_PER_HEAD: tl.constexpr, SCAN_BLOCK: tl.constexpr):
    """First and last position in [lo, hi) that some head of the unit attends (first > last
    when none, also when hi <= lo). Reads only the mask, SCAN_BLOCK positions per step."""
    offs_r = tl.arange(0, ROWS)
    row_ok = offs_r < HPU
    first = tl.full([], 0, tl.int32) + hi  # (tensors from the start: they are loop-carried)
    last = tl.full([], -1, tl.int32)
    for p0 in range(lo, hi, SCAN_BLOCK):
        offs = p0 + tl.arange(0, SCAN_BLOCK)
        ok = offs < hi
        valid, _ = _mask_tile(mask_base, offs_r, row_ok, offs, ok, smh, sms, mask_min, MASK_KIND, MASK_PER_HEAD)
        att = tl.max(valid.to(tl.int32), axis=0) > 0
        first = tl.minimum(first, tl.min(tl.where(att, offs, hi), axis=0))
        last = tl.maximum(last, tl.max(tl.where(att, offs, -1), axis=0))
    return first, last


@triton.jit
def _split_program(Q, K, V, MASK, WS_O, WS_M, WS_L,
                   sqh, sqd, skh, sks, skd, svh, svs, svd, smh, sms,
                   q_off, k_off, v_off, m_off, h0, kvh, ws_row,
                   S, N_SPLITS, split, qk_scale, mask_min,
                   HPU: tl.constexpr, R: tl.constexpr, HPU_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   MASK_KIND: tl.constexpr, MASK_PER_HEAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   TRIM: tl.constexpr, SCAN_BLOCK: tl.constexpr,
                   BLOCK_S: tl.constexpr, USE_DOT: tl.constexpr, SKIP_BRANCH: tl.constexpr):
    """The work of one (sequence, unit, split) with R query rows (HPU real, the rest padding)."""
    offs_r = tl.arange(0, R)
    row_ok = offs_r < HPU
    offs_d = tl.arange(0, D)
    offs_e = tl.arange(0, DV)
    q = tl.load(Q + q_off + (h0 + offs_r)[:, None] * sqh + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)  # [R, D], loaded once
    k_base = K + k_off + kvh * skh
    v_base = V + v_off + kvh * svh
    mask_base = MASK + m_off + h0 * smh

    # This split's blocks.
    n_blocks = tl.cdiv(S, BLOCK_S)
    if MASK_KIND != 0 and TRIM == 2:  # the attended span of the whole row, dealt out among the splits
        first, last = _attended_span(mask_base, smh, sms, mask_min, 0, S, HPU, HPU_PAD,
                                     MASK_KIND, MASK_PER_HEAD, SCAN_BLOCK)
        span_lo = tl.where(first <= last, first // BLOCK_S, 0)
        span_hi = tl.where(first <= last, last // BLOCK_S + 1, 0)
        per_split = tl.cdiv(span_hi - span_lo, N_SPLITS)
        blk_lo = span_lo + split * per_split
        blk_hi = tl.minimum(blk_lo + per_split, span_hi)
    else:  # the blocks of S dealt out in equal runs (the last splits may be empty)
        per_split = tl.cdiv(n_blocks, N_SPLITS)
        blk_lo = split * per_split
        blk_hi = tl.minimum(blk_lo + per_split, n_blocks)
        if MASK_KIND != 0 and TRIM == 1:  # cut the run down to the blocks it attends
            first, last = _attended_span(mask_base, smh, sms, mask_min, blk_lo * BLOCK_S,
                                         tl.minimum(blk_hi * BLOCK_S, S), HPU, HPU_PAD,
                                         MASK_KIND, MASK_PER_HEAD, SCAN_BLOCK)
            blk_hi = tl.where(first <= last, last // BLOCK_S + 1, blk_lo)
            blk_lo = tl.where(first <= last, first // BLOCK_S, blk_lo)

    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.zeros([R], dtype=tl.float32)
    acc = tl.zeros([R, DV], dtype=tl.float32)
    for blk in range(blk_lo, blk_hi):
        offs_s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
        in_rng = offs_s < S
        if MASK_KIND == 0:  # no mask: every position in range, no skipping
            valid = row_ok[:, None] & in_rng[None, :]
            m_i, l_i, acc = _attend_block(q, k_base, v_base, sks, skd, svs, svd, offs_s, offs_d, offs_e,
                                          in_rng, valid, 0.0, m_i, l_i, acc, qk_scale,
                                          False, USE_DOT, DOT_PRECISION)
        else:
            # The mask block first: it decides which K/V rows are read at all.
            valid, bias = _mask_tile(mask_base, offs_r, row_ok, offs_s, in_rng, smh, sms, mask_min,
                                     MASK_KIND, MASK_PER_HEAD)
            pos_ok = tl.max(valid.to(tl.int32), axis=0) > 0  # some head of the unit attends
            if SKIP_BRANCH:
                if tl.max(pos_ok.to(tl.int32), axis=0) > 0:
                    m_i, l_i, acc = _attend_block(q, k_base, v_base, sks, skd, svs, svd, offs_s, offs_d,
                                                  offs_e, pos_ok, valid, bias, m_i, l_i, acc, qk_scale,
                                                  MASK_KIND == 2, USE_DOT, DOT_PRECISION)
            else:
                m_i, l_i, acc = _attend_block(q, k_base, v_base, sks, skd, svs, svd, offs_s, offs_d,
                                              offs_e, pos_ok, valid, bias, m_i, l_i, acc, qk_scale,
                                              MASK_KIND == 2, USE_DOT, DOT_PRECISION)

    # Unnormalised partials of the HPU real rows: [rows, n_splits, HPU, (DV)] in fp32.
    row = ws_row * HPU + offs_r
    tl.store(WS_O + row[:, None] * DV + offs_e[None, :], acc, mask=row_ok[:, None])
    tl.store(WS_M + row, m_i, mask=row_ok)
    tl.store(WS_L + row, l_i, mask=row_ok)


@triton.jit
def _split_kernel(
    Q, K, V, MASK, UNIT, WS_O, WS_M, WS_L,
    sqb, sqh, sqd, skb, skh, sks, skd, svb, svh, svs, svd, smb, smh, sms, sub, suj,
    S, N_SEL, G, N_SPLITS, qk_scale, mask_min,
    S_KEY, ROWS_KEY, SPLITS_KEY, DEVICE_KEY,  # only for the autotune key (powers of two)
    HPU: tl.constexpr, ROWS_DOT: tl.constexpr, ROWS_FMA: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_PER_HEAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TRIM: tl.constexpr, SCAN_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr, USE_DOT: tl.constexpr, SKIP_BRANCH: tl.constexpr,
):
    """Grid (B * n_sel, n_splits). MASK_KIND: 0 none, 1 bool (loaded as uint8), 2 additive float.
    MASK_PER_HEAD: the mask has a head dimension (else one row serves every head).
    Rows: ROWS_DOT (>= 16, tl.dot) or ROWS_FMA (heads_per_unit rounded up to a power of 2)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // N_SEL
    j = pid % N_SEL
    b64 = b.to(tl.int64)  # batch offsets of a long static cache pass 2**31 elements
    unit = tl.load(UNIT + b64 * sub + j * suj).to(tl.int64)
    h0 = unit * HPU
    kvh = h0 // G
    ws_row = pid * N_SPLITS + split
    if USE_DOT:
        _split_program(Q, K, V, MASK, WS_O, WS_M, WS_L, sqh, sqd, skh, sks, skd, svh, svs, svd, smh, sms,
                       b64 * sqb, b64 * skb, b64 * svb, b64 * smb, h0, kvh, ws_row,
                       S, N_SPLITS, split, qk_scale, mask_min,
                       HPU, ROWS_DOT, ROWS_FMA, D, DV, MASK_KIND, MASK_PER_HEAD, DOT_PRECISION, TRIM, SCAN_BLOCK,
                       BLOCK_S, USE_DOT, SKIP_BRANCH)
    else:
        _split_program(Q, K, V, MASK, WS_O, WS_M, WS_L, sqh, sqd, skh, sks, skd, svh, svs, svd, smh, sms,
                       b64 * sqb, b64 * skb, b64 * svb, b64 * smb, h0, kvh, ws_row,
                       S, N_SPLITS, split, qk_scale, mask_min,
                       HPU, ROWS_FMA, ROWS_FMA, D, DV, MASK_KIND, MASK_PER_HEAD, DOT_PRECISION, TRIM, SCAN_BLOCK,
                       BLOCK_S, USE_DOT, SKIP_BRANCH)


@triton.jit
def _combine_kernel(UNIT, WS_O, WS_M, WS_L, OUT,
                    sub, suj, sob, soh, soe,
                    N_SEL, N_UNITS, N_SPLITS,
                    HPU: tl.constexpr, R: tl.constexpr, DV: tl.constexpr, NSEL_PAD: tl.constexpr):
    """Grid (B * n_units,): merge the splits of one (sequence, unit) and write its HPU output
    rows; an unselected unit finds no slot, loads nothing and writes zeros."""
    pid = tl.program_id(0)
    b = pid // N_UNITS
    u = pid % N_UNITS
    offs_j = tl.arange(0, NSEL_PAD)
    idx = tl.load(UNIT + b.to(tl.int64) * sub + offs_j * suj, mask=offs_j < N_SEL, other=-1)
    hit = idx == u
    found = tl.max(hit.to(tl.int32), axis=0)  # 1 or 0
    slot = tl.max(tl.where(hit, offs_j, 0), axis=0)  # (a duplicate would still name a real slot)
    offs_r = tl.arange(0, R)
    offs_e = tl.arange(0, DV)
    row_ok = offs_r < HPU
    # Rows to load: all HPU rows of a selected unit, none of an unselected one. (An integer
    # compare: the interpreter turns a bool tensor & bool scalar into an int mask.)
    load_ok = offs_r < HPU * found
    row0 = (b * N_SEL + slot) * N_SPLITS
    m = tl.full([R], float("-inf"), tl.float32)
    l = tl.zeros([R], dtype=tl.float32)
    acc = tl.zeros([R, DV], dtype=tl.float32)
    for s in range(0, N_SPLITS):
        row = (row0 + s) * HPU + offs_r
        m_s = tl.load(WS_M + row, mask=load_ok, other=float("-inf"))
        l_s = tl.load(WS_L + row, mask=load_ok, other=0.0)
        o_s = tl.load(WS_O + row[:, None] * DV + offs_e[None, :], mask=load_ok[:, None], other=0.0)
        m_new = tl.maximum(m, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_use)
        w = tl.exp2(m_s - m_use)
        acc = acc * a[:, None] + o_s * w[:, None]
        l = l * a + l_s * w
        m = m_new
    out = tl.where(l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)  # nothing attended: 0
    h = u * HPU + offs_r
    tl.store(OUT + b.to(tl.int64) * sob + h[:, None] * soh + offs_e[None, :] * soe,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Configs and autotuning
# ----------------------------------------------------------------------------------------------


def _cfg(use_dot, block_s, warps, stages, skip_branch=False):
    return triton.Config(dict(USE_DOT=use_dot, BLOCK_S=block_s, SKIP_BRANCH=skip_branch),
                         num_warps=warps, num_stages=stages)


# Short list. The tensor-core path with a straight loop body (Triton pipelines its K/V loads
# into shared memory) at three block lengths; one with a branch per block (never pipelined,
# but it skips the math of excluded blocks inside the attended span: masks with holes); the
# register path for one or two rows per unit (no layout conversion, no padding to 16 rows).
CONFIGS = [
    _cfg(True, 64, 4, 3),
    _cfg(True, 128, 4, 2),
    _cfg(True, 128, 8, 3),
    _cfg(True, 32, 4, 3),
    _cfg(True, 64, 4, 1, skip_branch=True),
    _cfg(False, 32, 4, 1),
    _cfg(False, 64, 4, 2),
    _cfg(False, 128, 8, 2),
]

#: Used in the interpreter (no autotuning there) unless a test passes its own.
INTERPRET_CONFIG = dict(USE_DOT=True, BLOCK_S=16, SKIP_BRANCH=False, num_warps=4)

#: Register path budget: elements of the [rows, BLOCK_S, head dim] product tile per thread
#: (sm_90 compile: 64 per thread takes about 170-220 registers, 128 hits the 255 ceiling).
_FMA_PER_THREAD = 64
#: Shared memory the pipelined K/V tiles may take (H100/H200: 227 KiB per block).
_SMEM_LIMIT = 160 * 1024


def _prune(configs, named_args, **kwargs):
    """Drop blocks much longer than the context, register tiles that would spill and
    pipelines whose K/V stages would not fit in shared memory (D = Dv = 256)."""
    s, rows = int(named_args["S_KEY"]), kwargs["ROWS_FMA"]
    d, dv = kwargs["D"], kwargs["DV"]
    elem = named_args["K"].element_size() if hasattr(named_args.get("K"), "element_size") else 2
    keep = []
    for c in configs:
        bs = c.kwargs["BLOCK_S"]
        if bs > max(32, triton.next_power_of_2(max(s, 1))):
            continue
        if not c.kwargs["USE_DOT"] and rows * bs * max(d, dv) > _FMA_PER_THREAD * 32 * c.num_warps:
            continue
        if max(c.num_stages, 1) * bs * (d + dv) * elem > _SMEM_LIMIT:
            continue
        keep.append(c)
    return keep or configs[:1]


_TUNED = None


def _tuned_kernel():
    global _TUNED
    if _TUNED is None:
        # Bucketed sizes: a dynamic cache grows S by one per token, and keying on S itself
        # would re-tune at every step.
        key = ["S_KEY", "ROWS_KEY", "SPLITS_KEY", "HPU", "D", "DV", "MASK_KIND", "MASK_PER_HEAD", "DEVICE_KEY"]
        _TUNED = rt.autotune(CONFIGS, key, prune=_prune)(_split_kernel)
    return _TUNED


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_splits(batch: int, n_sel: int, seq_len: int, sms: int) -> int:
    """Context splits per (sequence, unit): about PROGRAMS_PER_SM programs per SM, each split
    at least MIN_SPLIT_LEN positions, at most MAX_SPLITS. Static shapes only."""
    programs = max(batch * n_sel, 1)
    want = triton.cdiv(PROGRAMS_PER_SM * sms, programs)
    cap = max(seq_len // MIN_SPLIT_LEN, 1)
    return int(max(1, min(want, cap, MAX_SPLITS)))


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    """fp32 partials, allocated per call (from the caching allocator; fine inside graph capture).
    Every entry the combine reads is written by the split kernel first: no zeroing needed."""
    return torch.empty(max(int(numel), 1), dtype=torch.float32, device=device)


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0 and n <= MAX_HEAD_DIM


def supports(q, k, v, attn_mask, heads_per_unit) -> bool:
    """Whether `launch_head_sparse_decode` takes these inputs (else use the reference/dense path)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != 1:
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return False
    if not (q.device == k.device == v.device):
        return False
    if q.device.type != "cuda" and not (q.device.type == "cpu" and rt.interpreting()):
        return False
    B, Hq, _, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or tuple(v.shape[:3]) != (B, Hkv, S) or Dk != D or Hkv == 0 or Hq % Hkv:
        return False
    if not (_pow2_at_least_16(D) and _pow2_at_least_16(v.shape[3])):
        return False
    G = Hq // Hkv
    hpu = int(heads_per_unit)
    if hpu < 1 or hpu > MAX_HEADS_PER_UNIT or G % hpu:  # a unit must read one KV head
        return False
    if attn_mask is not None:
        if attn_mask.device != q.device or attn_mask.dim() > 4:
            return False
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            return False
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, Hq, 1, S))
        except RuntimeError:
            return False
        if attn_mask.dim() == 4 and attn_mask.shape[2] != 1:
            return False
    return True


def launch_head_sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    unit_idx: torch.Tensor,
    heads_per_unit: int,
    scale: float,
    config: Optional[dict] = None,
    n_splits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Selected-unit decode attention -> [B, Hq, 1, Dv] in q's dtype (0 for unselected heads).

    q [B, Hq, 1, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] of any strides; attn_mask None, bool or
    additive float broadcastable to [B, Hq, 1, S]; unit_idx [B, n_sel] (or [B, 1, n_sel]) int32
    or int64, no duplicates in a row. Always the Triton kernels (check `supports` first).
    `config` pins the split kernel's config (tests, interpreter); `n_splits` overrides
    `choose_splits` (tests); `out` ([B, Hq, 1, Dv], q's dtype, any strides) receives the result.
    """
    assert supports(q, k, v, attn_mask, heads_per_unit), "inputs not supported: use the reference path"
    B, Hq, _, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    hpu = int(heads_per_unit)
    n_units = Hq // hpu
    dev = q.device
    if unit_idx.dim() == 3:
        assert unit_idx.shape[1] == 1, "the kernel decodes one token per sequence"
        unit_idx = unit_idx[:, 0]
    assert unit_idx.dim() == 2 and unit_idx.shape[0] == B and not unit_idx.dtype.is_floating_point
    assert unit_idx.device == dev
    n_sel = int(unit_idx.shape[1])
    assert n_sel <= n_units, "more selected units than units"

    if n_splits is None:
        n_splits = choose_splits(B, n_sel, S, num_sms(dev))
    n_splits = int(max(1, n_splits))

    if attn_mask is None:
        mask_kind, per_head, mask_min = 0, False, 0.0
        mask_t, smb, smh, sms = q, 0, 0, 0  # never read
    else:
        me = attn_mask.expand(B, Hq, 1, S)  # broadcast dims get stride 0
        per_head = Hq > 1 and me.stride(1) != 0
        smb, smh, sms = me.stride(0), me.stride(1), me.stride(3)
        if attn_mask.dtype == torch.bool:
            mask_kind, mask_min, mask_t = 1, 0.0, me.view(torch.uint8)
        else:
            mask_kind, mask_min, mask_t = 2, float(torch.finfo(attn_mask.dtype).min), me

    if out is None:
        out = torch.empty((B, Hq, 1, Dv), dtype=q.dtype, device=dev)
    assert tuple(out.shape) == (B, Hq, 1, Dv) and out.dtype == q.dtype and out.device == dev
    rows = B * n_sel
    ws_o = _workspace(rows * n_splits * hpu * Dv, dev)
    ws_m = _workspace(rows * n_splits * hpu, dev)
    ws_l = _workspace(rows * n_splits * hpu, dev)
    hpu_pad = triton.next_power_of_2(hpu)

    if rows > 0:
        args = [q, k, v, mask_t, unit_idx, ws_o, ws_m, ws_l,
                q.stride(0), q.stride(1), q.stride(3),
                k.stride(0), k.stride(1), k.stride(2), k.stride(3),
                v.stride(0), v.stride(1), v.stride(2), v.stride(3),
                smb, smh, sms, unit_idx.stride(0), unit_idx.stride(1),
                S, n_sel, G, n_splits, float(scale) * LOG2E, mask_min,
                triton.next_power_of_2(S), triton.next_power_of_2(rows), triton.next_power_of_2(n_splits),
                rt.device_key(dev)]
        meta = dict(HPU=hpu, ROWS_DOT=max(16, hpu_pad), ROWS_FMA=hpu_pad, D=D, DV=Dv,
                    MASK_KIND=mask_kind, MASK_PER_HEAD=per_head, DOT_PRECISION=rt.dot_precision(q.dtype),
                    TRIM=2 if mask_kind else 0, SCAN_BLOCK=SCAN_ELEMS // (hpu_pad if per_head else 1))
        grid = (rows, n_splits)
        if config is None and rt.interpreting():
            config = INTERPRET_CONFIG
        if config is not None:
            _split_kernel[grid](*args, **{**meta, **dict(config)})
        else:
            _tuned_kernel()[grid](*args, **meta)

    _combine_kernel[(B * n_units,)](
        unit_idx, ws_o, ws_m, ws_l, out,
        unit_idx.stride(0), unit_idx.stride(1), out.stride(0), out.stride(1), out.stride(3),
        n_sel, n_units, n_splits,
        HPU=hpu, R=hpu_pad, DV=Dv, NSEL_PAD=triton.next_power_of_2(max(n_sel, 1)), num_warps=4)
    return out
