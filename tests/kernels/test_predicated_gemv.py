"""The predicated sparse GEMV family (``predicated_gemv``) against the ops' pure-torch reference,
in Triton's CPU interpreter, and the per-key choice between it and the compacting kernel.

Both variants: with the finishing launch ("predicated") and with the last program finishing
("elect"). Odd shapes (tails in K and N, several K splits so the atomics, the counters and
the workspace reset are exercised), fp32/bf16/fp16, 1 and 2..16 rows, all-zero and all-active
inputs, biases, row scales, per-channel thresholds, 1 and 3 outputs.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from actsparse.kernels.triton import predicated_gemv as pg  # noqa: E402
from actsparse.kernels.triton import sparse_gemv as sg  # noqa: E402
from actsparse.ops.reference import sparse_linear_reference  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the Triton interpreter on CPU tensors")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
FAMILIES = ["predicated", "elect"]
CONFIGS = [  # interpreter-sized: several unrolled tiles, one tile, one program over all of K
    dict(BLOCK_K=16, BLOCK_N=32, TILES=2, num_warps=4),
    dict(BLOCK_K=16, BLOCK_N=16, TILES=1, num_warps=4, SKIP_EMPTY=False),
    dict(BLOCK_K=16, BLOCK_N=16, TILES=3, num_warps=4, W_EVICT="evict_first"),
    dict(BLOCK_K=32, BLOCK_N=64, TILES=8, num_warps=4),  # one split covers K
]
M1_CONFIG = dict(BLOCK_K=8, BLOCK_N=16, TILES=1, num_warps=2)  # single rows only (no tl.dot)


def assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = float(ref.float().abs().max()) + 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * EPS[dtype], atol=2 * EPS[dtype] * scale)


def cutoff(x, sparsity):
    if sparsity <= 0:
        return -1.0  # every channel active, zeros included
    if sparsity >= 1:
        return 1e30
    return float(torch.quantile(x.abs().float().flatten(), sparsity))


def case(M, K, ns, dtype, seed, sparsity=0.5, bias=True, row_scale=False, config=None, x=None, cts=None,
         family="predicated"):
    g = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(M, K, generator=g).to(dtype)
    ws = [torch.randn(n, K, generator=g).to(dtype) / 4 for n in ns]
    ws = [w.t().contiguous().t() if i % 2 == 0 else w for i, w in enumerate(ws)]  # both layouts
    bs = [(torch.randn(n, generator=g).to(dtype) if bias and i != 1 else None) for i, n in enumerate(ns)]
    ths = [cutoff(x, sparsity) * (1 + 0.1 * i) for i in range(len(ns))]
    rs = (torch.rand(M, generator=g) + 0.5) if row_scale else None
    out = sg.launch_sparse_linear(x, ws, bs, ths, rs, config=config, family=family,
                                  channel_thresholds=cts)
    assert sg.last_family() == family
    ref = sparse_linear_reference(x, ws, bs, [t if c is None else c for t, c in
                                              zip(ths, cts or [None] * len(ns))], scale=rs)
    for o, r in zip(out, ref):
        assert_close(o, r, dtype)
    return out, ref, bs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 5, 16])
@pytest.mark.parametrize("family", FAMILIES)
def test_predicated_grid(dtype, M, family):
    i = DTYPES.index(dtype) * 5 + M
    case(M, [17, 40, 72, 136][i % 4], [24] if i % 3 else [56, 24, 8], dtype, seed=i,
         sparsity=[0.0, 0.5, 0.9][i % 3], bias=i % 2 == 0, row_scale=i % 5 < 3, config=CONFIGS[i % len(CONFIGS)],
         family=family)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS + [M1_CONFIG], ids=lambda c: f"k{c['BLOCK_K']}n{c['BLOCK_N']}t{c['TILES']}")
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_one_odd_shapes(dtype, config, family):
    case(1, 53, [37, 13, 29], dtype, seed=3, sparsity=0.6, row_scale=True, config=config, family=family)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_all_zero_input_gives_bias(dtype, M, family):
    x = torch.zeros(M, 40, dtype=dtype)
    out, _, bs = case(M, 40, [24, 8], dtype, seed=1, sparsity=0.5, x=x, family=family)
    torch.testing.assert_close(out[0], bs[0].expand(M, -1))
    assert torch.count_nonzero(out[1]) == 0  # no bias on the second output
    out, _, _ = case(M, 40, [24, 8], dtype, seed=2, sparsity=1.0, family=family)  # threshold above every |x|
    assert torch.count_nonzero(out[1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 4])
def test_all_active_input_is_dense(dtype, M):
    """Threshold below every |x|: the dense product."""
    out, _, bs = case(M, 72, [40], dtype, seed=4, sparsity=0.0, config=CONFIGS[0])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, 72, generator=g).to(dtype)
    w = torch.randn(40, 72, generator=g).to(dtype) / 4
    assert_close(out[0], torch.nn.functional.linear(x.float(), w.float(), bs[0].float()).to(dtype), dtype)


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("family", FAMILIES)
def test_channel_thresholds(M, family):
    g = torch.Generator().manual_seed(9)
    ct0 = torch.rand(72, generator=g) * 1.5
    ct0[::7] = 0.0
    cts = [ct0, None, torch.full((72,), 1e30)]
    out, _, _ = case(M, 72, [56, 24, 40], torch.bfloat16, seed=9, bias=False, row_scale=M > 1, config=CONFIGS[0],
                     cts=cts, family=family)
    assert torch.count_nonzero(out[2]) == 0


def test_repeated_calls_and_families_share_a_clean_workspace():
    """The finishing launch re-zeroes the workspace the compacting kernel also uses."""
    a = case(4, 72, [56, 24], torch.float32, seed=6, config=CONFIGS[1])[0]
    x = torch.randn(3, 40)
    w = torch.randn(24, 40)
    (y,) = sg.launch_sparse_linear(x, [w], [None], [0.5], family="compact")
    assert sg.last_family() == "compact"
    assert_close(y, sparse_linear_reference(x, [w], [None], [0.5])[0], torch.float32)
    b = case(4, 72, [56, 24], torch.float32, seed=6, config=CONFIGS[1])[0]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


def test_forced_family_reaches_the_op():
    """The op-level path (dispatch forced to Triton) runs the family `forced_family` names."""
    from actsparse.ops import dispatch
    from actsparse.ops.sparse_linear import sparse_linear

    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 1, 40, generator=g, dtype=torch.bfloat16)
    ws = [torch.randn(24, 40, generator=g, dtype=torch.bfloat16).t().contiguous().t()]
    with dispatch.forced("triton"), sg.forced_family("predicated"):
        (y,) = sparse_linear(x, ws, [None], [0.4], False, 0.5)
    assert sg.last_family() == "predicated"
    (ref,) = sparse_linear_reference(x, ws, [None], [0.4])
    assert_close(y, ref, torch.bfloat16)


def test_pinned_config_picks_its_family():
    x = torch.randn(1, 40)
    w = torch.randn(24, 40)
    with sg.forced_family("predicated"):
        sg.launch_sparse_linear(x, [w], [None], [0.5], config=dict(COMPACT=True, CHUNK=32, BLOCK_K=16, BLOCK_N=32))
        assert sg.last_family() == "compact"
        sg.launch_sparse_linear(x, [w], [None], [0.5])
        assert sg.last_family() == "predicated"


def test_invalid_family_and_config_rejected():
    x = torch.randn(2, 40)
    w = torch.randn(24, 40)
    with pytest.raises(ValueError, match="family"):
        sg.launch_sparse_linear(x, [w], [None], [0.5], family="teal")
    with pytest.raises(ValueError, match="family"):
        with sg.forced_family("dense"):
            pass
    with pytest.raises(ValueError, match="BLOCK_K >= 16"):
        sg.launch_sparse_linear(x, [w], [None], [0.5], config=dict(M1_CONFIG))


def test_choose_family_times_once_and_skips_failures(monkeypatch):
    monkeypatch.setattr(sg, "FAMILY_CHOICES", {})
    monkeypatch.setattr(sg, "FAMILY_TIMES", {})
    calls = []

    def bench(fn):
        calls.append(fn)
        return fn()

    def broken():
        raise RuntimeError("no build")

    assert sg.choose_family(("k", 1), {"compact": lambda: 2.0, "predicated": lambda: 1.0}, bench) == "predicated"
    assert sg.choose_family(("k", 1), {"compact": lambda: 0.0, "predicated": lambda: 9.0}, bench) == "predicated"
    assert len(calls) == 2  # remembered per key
    with pytest.warns(UserWarning, match="predicated"):
        assert sg.choose_family(("k", 2), {"compact": lambda: 2.0, "predicated": broken}, bench) == "compact"
    assert math.isinf(sg.FAMILY_TIMES[("k", 2)]["predicated"])
    # no timing in the interpreter: the compacting kernel, not remembered
    assert sg.choose_family(("k", 3), {"compact": lambda: 2.0, "predicated": lambda: 1.0}) == "compact"
    assert ("k", 3) not in sg.FAMILY_CHOICES


def test_configs_are_well_formed():
    for c in pg.CONFIGS_M1 + pg.CONFIGS_DOT:
        assert {"BLOCK_K", "BLOCK_N", "TILES", "W_EVICT"} <= set(c.kwargs)
        assert c.kwargs["BLOCK_N"] >= 16
    for c in pg.CONFIGS_DOT:
        pg.check_config(c.kwargs, 16)  # tl.dot needs 16 channels per tile
    kept = pg._prune(pg.CONFIGS_M1, {"K": 40, "N_TOTAL": 24})
    assert kept and all(c.kwargs["BLOCK_K"] * c.kwargs["TILES"] <= 80 for c in kept)
    pg._tuned_kernel(1)  # the autotuner checks that every key names a kernel argument
    pg._tuned_kernel(16)


def test_launch_chooses_the_faster_family_per_key(monkeypatch):
    """Without a pinned family the launcher times both (here a fake clock that makes the
    predicated family faster), runs the winner and remembers it for the key."""
    monkeypatch.setattr(sg, "FAMILY_CHOICES", {})
    monkeypatch.setattr(sg, "FAMILY_TIMES", {})
    monkeypatch.setattr(sg, "_can_time", lambda: True)
    clock = iter([2.0, 1.0])

    def bench(fn):
        fn()  # the family really runs (in the interpreter)
        return next(clock)

    monkeypatch.setattr(sg.rt, "autotune_bench", bench)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 40, generator=g)
    w = torch.randn(24, 40, generator=g)
    (y,) = sg.launch_sparse_linear(x, [w], [None], [0.5], sparsity_hint=0.5)
    assert sg.last_family() == "predicated"
    assert sg.last_family_times() == {"compact": 2.0, "predicated": 1.0}
    assert_close(y, sparse_linear_reference(x, [w], [None], [0.5])[0], torch.float32)
    (y2,) = sg.launch_sparse_linear(x, [w], [None], [0.5], sparsity_hint=0.5)  # remembered: no timing
    assert sg.last_family() == "predicated"
    torch.testing.assert_close(y, y2)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_programs_with_no_active_channel_add_nothing(M, family):
    """Channels 0..47 zero in every row: the programs over them skip their atomics (SKIP_EMPTY),
    the others add theirs; the sums stay exact."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(M, 100, generator=g)
    x[:, :48] = 0
    for cfg in (CONFIGS[0], dict(CONFIGS[0], SKIP_EMPTY=False)):
        case(M, 100, [40, 24], torch.float32, seed=13, sparsity=0.3, x=x, config=cfg, family=family)


@pytest.mark.parametrize("epilogue", [None, "silu"])
def test_elect_leaves_counters_and_sums_at_zero(epilogue):
    """The last program resets its block's counter and sums: a second call, and a call of the
    other variants on the same buffers, see clean state and give the same result."""
    from actsparse.kernels.triton import _runtime as rt

    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 72, generator=g)
    ws = [torch.randn(40, 72, generator=g) / 4 for _ in range(2)]
    outs = {}
    for fam in ("elect", "predicated", "elect"):
        outs.setdefault(fam, []).append(sg.launch_sparse_linear(x, ws, [None, None], [0.4, 0.5], family=fam,
                                                                epilogue=epilogue, config=CONFIGS[0]))
        for name in ("ws", "pcnt"):
            buf = rt._BUFFERS.get((name, torch.float32 if name == "ws" else torch.int32, "cpu", None))
            assert buf is not None and torch.count_nonzero(buf) == 0, name
    for a, b in zip(outs["elect"][0] + outs["predicated"][0], outs["elect"][1] + outs["predicated"][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ref = sparse_linear_reference(x, ws, [None, None], [0.4, 0.5])
    want = [torch.nn.functional.silu(ref[0]) * ref[1]] if epilogue else ref
    for o, r in zip(outs["elect"][0], want):
        assert_close(o, r, torch.float32)


def test_elect_is_forced_not_chosen():
    """The per-key choice leaves the elect variant out (slower on the GPU); forcing reaches it."""
    assert "elect" in sg.FAMILIES and "elect" not in sg.CHOSEN_FAMILIES
    x = torch.randn(1, 40)
    w = torch.randn(24, 40)
    with sg.forced_family("elect"):
        (y,) = sg.launch_sparse_linear(x, [w], [None], [0.5])
        assert sg.last_family() == "elect"
        sg.launch_sparse_linear(x, [w], [None], [0.5], config=dict(CONFIGS[0]))
        assert sg.last_family() == "elect"
    assert_close(y, sparse_linear_reference(x, [w], [None], [0.5])[0], torch.float32)


def test_small_block_n_refused():
    with pytest.raises(ValueError, match="BLOCK_N >= 16"):
        pg.check_config(dict(BLOCK_K=16, BLOCK_N=8, TILES=1), 1)
