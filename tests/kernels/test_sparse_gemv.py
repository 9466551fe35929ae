"""The Triton split-K sparse GEMV against the ops' pure-torch reference, in Triton's CPU interpreter.

Small and odd shapes (tails in every dimension, several K chunks so the split-K reduction and
its self-cleaning workspace are exercised), all three dtypes, batch 1..16, masks from dense to
all-zero, per-row scales, 1 and 3 outputs, biases, row-major and input-major weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from actsparse.kernels import triton as tk  # noqa: E402
from actsparse.kernels.triton import sparse_gemv as sg  # noqa: E402
from actsparse.ops.reference import sparse_linear_reference  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the Triton interpreter on CPU tensors")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
CONFIGS = [  # interpreter-sized versions of both kernel paths
    dict(COMPACT=True, CHUNK=32, BLOCK_K=16, BLOCK_N=32, num_warps=4),
    dict(COMPACT=False, CHUNK=32, BLOCK_K=16, BLOCK_N=32, num_warps=4),
    dict(COMPACT=True, CHUNK=16, BLOCK_K=16, BLOCK_N=16, num_warps=4),
    dict(COMPACT=True, CHUNK=128, BLOCK_K=32, BLOCK_N=64, num_warps=4),  # one chunk, one block
    dict(COMPACT=True, CHUNK=32, BLOCK_K=16, BLOCK_N=16, num_warps=4, PREFETCH=False),  # plain loop
]


def assert_close(out, ref, dtype):
    """Outputs are fp32 sums rounded to dtype: allow a couple of ulps of the largest value."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = float(ref.float().abs().max()) + 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * EPS[dtype], atol=2 * EPS[dtype] * scale)


def weight(n, k, dtype, input_major, g):
    w = torch.randn(n, k, generator=g).to(dtype) / 4
    return w.t().contiguous().t() if input_major else w


def threshold_for(x, sparsity):
    """A threshold that zeroes about `sparsity` of x (-1: keep all, inf-like: drop all)."""
    if sparsity <= 0:
        return -1.0
    if sparsity >= 1:
        return 1e30
    return float(torch.quantile(x.abs().float().flatten(), sparsity))


def run_case(M, K, ns, dtype, seed, sparsity=0.5, input_major=True, bias=True, row_scale=False, config=None,
             dead_rows=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    for r in dead_rows:
        x[r] = 0
    ws = [weight(n, K, dtype, input_major if i % 2 == 0 else not input_major, g) for i, n in enumerate(ns)]
    bs = [(torch.randn(n, generator=g).to(dtype) if bias and i != 1 else None) for i, n in enumerate(ns)]
    ths = [threshold_for(x, sparsity) * (1 + 0.1 * i) for i in range(len(ns))]
    rs = (torch.rand(M, generator=g) + 0.5) if row_scale else None
    if config is not None and M > 1 and not config["COMPACT"]:
        config = dict(config, COMPACT=True)  # the predicated path is for single rows
    out = sg.launch_sparse_linear(x, ws, bs, ths, rs, config=config)
    ref = sparse_linear_reference(x, ws, bs, ths, scale=rs)
    for o, r in zip(out, ref):
        assert_close(o, r, dtype)
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 16])
def test_sparse_linear_grid(dtype, M):
    # rotate the other parameters through the grid so every combination of each pair shows up
    i = DTYPES.index(dtype) * 7 + M
    run_case(M, 40 if i % 2 else 72, [24] if i % 3 else [56, 24, 8], dtype, seed=i,
             sparsity=[0.0, 0.5, 0.9][i % 3], input_major=i % 4 != 0, bias=i % 2 == 0,
             row_scale=i % 5 < 3, config=CONFIGS[i % len(CONFIGS)])


@SETTINGS
@given(M=st.integers(1, 16), K=st.sampled_from([40, 72, 17]), n0=st.sampled_from([24, 56, 8]),
       num_out=st.integers(1, 3), dtype=st.sampled_from(DTYPES), sparsity=st.sampled_from([0.0, 0.3, 0.7, 0.95, 1.0]),
       input_major=st.booleans(), bias=st.booleans(), row_scale=st.booleans(),
       config=st.sampled_from(range(len(CONFIGS))), seed=st.integers(0, 2**16))
def test_sparse_linear_random(M, K, n0, num_out, dtype, sparsity, input_major, bias, row_scale, config, seed):
    ns = [n0, 24, 40][:num_out]
    run_case(M, K, ns, dtype, seed, sparsity, input_major, bias, row_scale, CONFIGS[config])


@pytest.mark.parametrize("M", [2, 3, 5, 16])
@pytest.mark.parametrize("prefetch", [True, False])
def test_batch_split_k_three_outputs_with_tails(M, prefetch):
    """The structure of the batch cases that returned wrong sums on an H100: 2..16 rows (padded
    to 16 for the tl.dot path), three outputs whose N are not multiples of BLOCK_N, mixed
    weight layouts, biases, row scales, and K split over several chunks with a tail, so every
    output block is finished by a last-arriving program. (The race itself, a workspace reset
    racing a read of the same element by another thread, needs a GPU; the interpreter runs
    one thread. These cases pin the function the GPU self-check compares against.)"""
    cfg = dict(COMPACT=True, CHUNK=32, BLOCK_K=16, BLOCK_N=16, num_warps=4, PREFETCH=prefetch)
    run_case(M, 136, [64, 16, 24], torch.bfloat16, seed=20 + M, sparsity=0.5, row_scale=True, config=cfg)
    run_case(M, 136, [40], torch.float32, seed=30 + M, sparsity=0.8, row_scale=False, config=cfg)


def test_epilogue_reads_workspace_before_resetting_it():
    """The last-arriving program must read the fp32 sums, then synchronise its threads, then
    reset the workspace: without the barrier a thread holding a replicated copy of an element
    read a zero on the GPU (batch rows 2..16)."""
    import inspect

    src = inspect.getsource(sg._linear_tile.fn)
    epi = src[src.index("if done =="):]
    i_load = epi.index("tot = tl.load(ws")
    i_bar = epi.index("tl.debug_barrier()")
    i_reset = epi.index("tl.store(ws, tl.zeros")
    assert i_load < i_bar < i_reset


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"compact{int(c['COMPACT'])}-chunk{c['CHUNK']}-bn{c['BLOCK_N']}")
def test_all_zero_mask_gives_bias(config):
    out, _ = run_case(5, 40, [24, 8], torch.float32, seed=1, sparsity=1.0, bias=True, config=config)
    assert torch.count_nonzero(out[1]) == 0  # no bias on the second output


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_without_and_with_all_channels(dtype):
    # rows 0 and 3 are all zero (no active channel), the rest fully active (threshold -1)
    run_case(5, 72, [56], dtype, seed=3, sparsity=0.0, dead_rows=(0, 3), row_scale=True)
    run_case(5, 72, [56], dtype, seed=4, sparsity=0.6, dead_rows=(1,), row_scale=False)


def test_row_scale_per_row_cutoff():
    """A huge scale on one row empties that row only."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=g)
    w = weight(24, 40, torch.float32, True, g)
    rs = torch.tensor([1.0, 1e9, 0.5])
    (out,) = sg.launch_sparse_linear(x, [w], [None], [0.5], rs)
    (ref,) = sparse_linear_reference(x, [w], [None], [0.5], scale=rs)
    assert_close(out, ref, torch.float32)
    assert torch.count_nonzero(out[1]) == 0


def test_repeated_calls_leave_workspace_clean():
    """The last program of each block re-zeroes the shared workspace: calls do not leak."""
    a = run_case(4, 72, [56, 24], torch.float32, seed=6, config=CONFIGS[2])[0]
    run_case(16, 40, [8], torch.bfloat16, seed=7, config=CONFIGS[0])
    b = run_case(4, 72, [56, 24], torch.float32, seed=6, config=CONFIGS[2])[0]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


def test_strided_input_and_fp32_row_scale_cast():
    g = torch.Generator().manual_seed(8)
    xbig = torch.randn(3, 80, generator=g, dtype=torch.float16)
    x = xbig[:, ::2]  # non-contiguous
    w = weight(24, 40, torch.float16, False, g)
    rs = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float16)
    (out,) = sg.launch_sparse_linear(x, [w], [None], [0.7], rs)
    (ref,) = sparse_linear_reference(x, [w], [None], [0.7], scale=rs)
    assert_close(out, ref, torch.float16)


def test_is_available_under_interpreter():
    assert tk.is_available()


def test_predicated_path_rejects_batches():
    x = torch.randn(2, 40)
    w = torch.randn(24, 40)
    with pytest.raises(Exception):
        sg.launch_sparse_linear(x, [w], [None], [0.5], config=dict(CONFIGS[1]))


# ---------------------------------------------------------------- per-channel thresholds


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_thresholds(M, dtype):
    """A 1-D fp32 tensor of K cutoffs per output replaces the scalar threshold (times the row
    scale); outputs without one keep their scalar threshold."""
    g = torch.Generator().manual_seed(40 + M)
    K = 72
    x = torch.randn(M, K, generator=g).to(dtype)
    ws = [weight(n, K, dtype, i != 1, g) for i, n in enumerate([56, 24, 40])]
    bs = [torch.randn(56, generator=g).to(dtype), None, None]
    ct0 = torch.rand(K, generator=g) * 1.5  # per-channel cutoffs, some channels nearly always on
    ct0[::7] = 0.0
    ct2 = torch.full((K,), 1e30)  # channel thresholds that drop everything
    cts = [ct0, None, ct2]
    ths = [123.0, 0.6, -1.0]  # ignored where a channel threshold is given
    rs = (torch.rand(M, generator=g) + 0.5) if M != 3 else None
    for cfg in (CONFIGS[0], CONFIGS[4]) + ((CONFIGS[1],) if M == 1 else ()):
        out = sg.launch_sparse_linear(x, ws, bs, ths, rs, config=cfg, channel_thresholds=cts)
        ref = sparse_linear_reference(x, ws, bs, [t if c is None else c for t, c in zip(ths, cts)], scale=rs)
        for o, r in zip(out, ref):
            assert_close(o, r, dtype)
        assert torch.count_nonzero(out[2]) == 0
