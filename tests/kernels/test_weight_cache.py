"""Cached-weight index: output equals the gather reference after every step, for any mask sequence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.ops import cached_sparse_linear as cached_ops
from actsparse.ops.reference import cached_sparse_linear_reference
from actsparse.kernels.weight_cache import (
    WeightRowCache,
    cached_matmul,
    cached_output_matmul,
    gather_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def next_mask(prev: torch.Tensor, count: int, overlap: float, g: torch.Generator) -> torch.Tensor:
    """A mask with ``count`` active rows of which ``round(overlap * count)`` were active in prev."""
    R = prev.numel()
    act = prev.nonzero().squeeze(1)
    inact = (~prev).nonzero().squeeze(1)
    act = act[torch.randperm(act.numel(), generator=g)]
    inact = inact[torch.randperm(inact.numel(), generator=g)]
    keep = min(round(overlap * count), act.numel())
    fresh = min(count - keep, inact.numel())
    keep = count - fresh  # not enough inactive rows: keep more old ones
    chosen = torch.cat([act[:keep], inact[:fresh]])
    m = torch.zeros(R, dtype=torch.bool)
    m[chosen] = True
    return m


def mask_sequence(R, steps, density, overlap, seed, specials=True):
    """Masks at a given density with controlled overlap; with ``specials`` some steps are
    replaced by empty or full masks."""
    g = torch.Generator().manual_seed(seed)
    count = round(density * R)
    prev = torch.zeros(R, dtype=torch.bool)
    prev = next_mask(prev, count, 0.0, g)
    out = [prev]
    for _ in range(steps - 1):
        u = torch.rand((), generator=g).item()
        if specials and u < 0.1:
            m = torch.zeros(R, dtype=torch.bool)
        elif specials and u < 0.2:
            m = torch.ones(R, dtype=torch.bool)
        else:
            m = next_mask(prev, count, overlap, g)
        out.append(m)
        prev = m
    return out


def error_bound(x, rows, mask, dtype):
    """Rounding-error bound of x[.., mask] @ rows[mask] for any summation order, in float64."""
    xa = (x.double() * mask).abs()
    absum = xa @ rows.double().abs()
    K = rows.shape[0]
    return absum * (4 * EPS[dtype] + 2 * K * 2.0**-24) + 1e-30


def assert_matches(y, x, rows, mask, dtype):
    ref = (x.double() * mask) @ rows.double()
    bound = error_bound(x, rows, mask, dtype)
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item()} (bound {bound.max().item()})"


def check_invariants(cache: WeightRowCache, mask: torch.Tensor):
    buf, idx = cache.prefix()
    assert idx.numel() == int(mask.sum())
    assert torch.equal(idx.sort().values, mask.nonzero().squeeze(1))  # unique, exactly the mask
    assert torch.equal(buf, cache.rows[idx])  # slot i holds rows[index[i]], bit for bit
    assert torch.equal(cache.slot_of[idx], torch.arange(idx.numel()))
    assert torch.equal(cache.present, mask)


def make_rows(R, C, dtype, g, layout):
    """Source rows as a contiguous tensor, a transposed view, or an offset strided slice."""
    if layout == "contig":
        return torch.randn(R, C, generator=g).to(dtype)
    if layout == "transposed":  # W^T of an nn.Linear weight [C, R]
        return torch.randn(C, R, generator=g).to(dtype).t()
    big = torch.randn(R + 3, 2 * C + 1, generator=g).to(dtype)
    return big[3:, 1::2]


@SETTINGS
@given(
    R=st.integers(1, 70),
    C=st.integers(1, 33),
    M=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    overlap=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    steps=st.integers(1, 12),
    layout=st.sampled_from(["contig", "transposed", "strided"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_every_step(R, C, M, dtype, density, overlap, steps, layout, seed):
    g = torch.Generator().manual_seed(seed)
    rows = make_rows(R, C, dtype, g, layout)
    cache = WeightRowCache(rows)
    for mask in mask_sequence(R, steps, density, overlap, seed):
        x = torch.randn(M, R, generator=g).to(dtype)
        prev = cache.present.clone()
        y = cached_matmul(cache, x, mask)
        assert y.shape == (M, C) and y.dtype == dtype
        check_invariants(cache, mask)
        added = int((mask & ~prev).sum())
        assert cache.rows_copied_last == added + cache.rows_moved_last
        # compaction moves only what must move: at most the number of surplus holes
        assert cache.rows_moved_last <= max(0, int((prev & ~mask).sum()) - added)
        assert_matches(y, x, rows, mask, dtype)
        if dtype == torch.float32 and mask.any():
            torch.testing.assert_close(y, gather_reference(rows, x, mask), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    R=st.integers(1, 50),
    C=st.integers(1, 17),
    M=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    density=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    steps=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_union_exact_per_sequence(R, C, M, dtype, density, steps, seed):
    """Each sequence has its own mask; the cache holds the union; each row is exact."""
    g = torch.Generator().manual_seed(seed)
    rows = make_rows(R, C, dtype, g, "transposed")
    cache = WeightRowCache(rows)
    seqs = [mask_sequence(R, steps, density, 0.7, seed + i) for i in range(M)]
    for t in range(steps):
        masks = torch.stack([s[t] for s in seqs])
        x = torch.randn(M, R, generator=g).to(dtype)
        y = cached_matmul(cache, x, masks)
        check_invariants(cache, masks.any(0))
        for i in range(M):
            assert_matches(y[i : i + 1], x[i : i + 1], rows, masks[i], dtype)
            if dtype == torch.float32 and masks[i].any():
                ref = gather_reference(rows, x[i], masks[i])
                torch.testing.assert_close(y[i], ref, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    N=st.integers(1, 40),
    K=st.integers(1, 23),
    dtype=st.sampled_from(DTYPES),
    steps=st.integers(1, 8),
    batch=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_output_sparse(N, K, dtype, steps, batch, seed):
    """CATS-style output sparsity: cache over rows of W itself."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g).to(dtype)
    cache = WeightRowCache(W)
    for t, mask in enumerate(mask_sequence(N, steps, 0.5, 0.8, seed)):
        x = torch.randn(3, K, generator=g).to(dtype)
        if batch:
            mask = torch.stack([mask, mask_sequence(N, 1, 0.3, 0.0, seed + t + 1)[0], mask])
        y = cached_output_matmul(cache, x, mask)
        ref = (x.double() @ W.double().t()) * mask
        bound = ((x.double().abs() @ W.double().abs().t()) * mask) * (4 * EPS[dtype] + 2 * K * 2.0**-24)
        assert bool(((y.double() - ref).abs() <= bound + 1e-30).all())
        assert bool((y[~mask.expand_as(y)] == 0).all())


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.9, 1.0])
def test_rows_copied_match_overlap(overlap):
    R, C, count = 200, 8, 100
    rows = torch.randn(R, C)
    cache = WeightRowCache(rows)
    masks = mask_sequence(R, 6, count / R, overlap, 0, specials=False)
    cache.step(masks[0])
    assert cache.rows_copied_last == count
    for m in masks[1:]:
        cache.step(m)
        # equal counts in and out: every added row reuses a freed slot, nothing moves
        assert cache.rows_copied_last == count - round(overlap * count)
        assert cache.rows_moved_last == 0 and cache.n == count
    assert cache.steps == 6
    assert cache.rows_copied_total == count + 5 * (count - round(overlap * count))


def test_compaction_moves_tail_into_holes():
    rows = torch.arange(10.0).repeat_interleave(2).reshape(10, 2)
    cache = WeightRowCache(rows)
    cache.step(torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool))  # slots 0..5
    m = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)  # free slots 0, 2, 4
    buf, idx = cache.step(m)
    # 3 live rows: hole 0 and 2 are filled from the tail (slots 3, 5), hole 4 falls off
    assert cache.rows_moved_last == 2 and cache.rows_copied_last == 2
    check_invariants(cache, m)
    # grow again: appended after the prefix
    m2 = m.clone()
    m2[7:] = True
    buf, idx = cache.step(m2)
    assert cache.rows_copied_last == 3 and cache.rows_moved_last == 0
    assert torch.equal(idx[:3].sort().values, torch.tensor([1, 3, 5]))
    check_invariants(cache, m2)


@pytest.mark.parametrize("dtype,C", [(torch.float32, 8), (torch.float32, 7), (torch.bfloat16, 24), (torch.float16, 5)])
def test_copies_are_bitwise(dtype, C):
    """Arbitrary bit patterns (NaN payloads, denormals, -0) survive the wide-element copies."""
    R = 90
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**15), 2**15, (R, C), generator=g, dtype=torch.int32)
    itype = torch.int32 if dtype == torch.float32 else torch.int16
    rows = bits.to(itype).view(dtype) if dtype != torch.float32 else (bits * 65537).view(dtype)
    cache = WeightRowCache(rows)
    assert (cache._wide is not None) == ((C * rows.element_size()) % 16 == 0)
    for m in mask_sequence(R, 15, 0.5, 0.6, 3):
        buf, idx = cache.step(m)
        assert torch.equal(buf.view(itype), rows[idx].view(itype))


def test_empty_and_full_masks():
    rows = torch.randn(13, 5)
    cache = WeightRowCache(rows)
    x = torch.randn(2, 13)
    empty = torch.zeros(13, dtype=torch.bool)
    full = torch.ones(13, dtype=torch.bool)
    for m in [empty, full, full, empty, empty, full]:
        y = cached_matmul(cache, x, m)
        assert y.shape == (2, 5)
        if m.any():
            torch.testing.assert_close(y, x @ rows, rtol=1e-5, atol=1e-5)
        else:
            assert bool((y == 0).all())
        check_invariants(cache, m)
    assert cache.rows_copied_total == 13 * 2  # full after empty copies all; full after full none


def test_reset_copies_everything_next():
    R = 64
    rows = torch.randn(R, 7)
    cache = WeightRowCache(rows)
    masks = mask_sequence(R, 4, 0.5, 0.9, 1, specials=False)
    for m in masks[:3]:
        cache.step(m)
    cache.reset()
    assert cache.n == 0 and not cache.present.any() and cache.resets == 1
    y = cached_matmul(cache, torch.ones(1, R), masks[3])
    assert cache.rows_copied_last == int(masks[3].sum())
    check_invariants(cache, masks[3])
    torch.testing.assert_close(y[0], rows[masks[3]].sum(0))


def test_capacity_bound_and_overflow():
    R, C, cap = 40, 6, 10
    rows = torch.randn(R, C, dtype=torch.bfloat16)
    cache = WeightRowCache(rows, capacity=cap)
    assert cache.buffer_nbytes == cap * C * 2
    staging = min(cap, 64)
    assert cache.nbytes == (cap + staging) * C * 2 + cap * 8 * 2 + R * 8 + R
    assert cache.source_nbytes == 0
    small = torch.zeros(R, dtype=torch.bool)
    small[:8] = True
    big = torch.zeros(R, dtype=torch.bool)
    big[5:25] = True
    x = torch.randn(1, R, dtype=torch.bfloat16)
    for m in [small, big, small, big, big]:
        y = cached_matmul(cache, x, m)
        assert_matches(y, x, rows, m, torch.bfloat16)
        assert cache.n <= cap
        if m is big:
            assert cache.n == 0
        else:
            check_invariants(cache, m)
    assert cache.overflows == 3
    with pytest.raises(ValueError):
        WeightRowCache(rows, capacity=R + 1)


def test_from_weight_layouts():
    W = torch.randn(9, 21)
    c1 = WeightRowCache.from_weight(W)
    c2 = WeightRowCache.from_weight(W, input_major=False)
    assert c1.rows.is_contiguous() and c1.source_nbytes == W.numel() * 4
    assert not c2.rows.is_contiguous() and c2.source_nbytes == 0
    m = torch.rand(21, generator=torch.Generator().manual_seed(0)) > 0.4
    x = torch.randn(2, 21)
    for c in (c1, c2):
        torch.testing.assert_close(cached_matmul(c, x, m), torch.nn.functional.linear(x * m, W))


# ---------------------------------------------------------------------- the custom op


@pytest.fixture(autouse=True)
def _clean_registry():
    cached_ops.release_all()
    yield
    cached_ops.release_all()


def _decode_inputs(K, steps, seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, K, generator=g) for s in shapes[:steps]]


@pytest.mark.parametrize("bias", [True, False])
def test_op_matches_reference_decode_and_prefill(bias):
    N, K, t = 19, 33, 0.6
    g = torch.Generator().manual_seed(3)
    W = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    R = cached_ops.CACHE_MAX_ROWS
    shapes = [(1, 1), (1, 1), (2, 1), (1, R + 1), (1, 1), (R,), (1,), (4, 1), (0,)]
    for x in _decode_inputs(K, len(shapes), 4, shapes):
        y = cached_ops.cached_sparse_linear(x, W, b, t, 0)
        ref = cached_sparse_linear_reference(x, W, b, t)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        cache = cached_ops.get_cache(0, W)
        if x.numel() // K > R:  # prefill went dense and reset the site
            assert cache.n == 0
        elif x.numel():
            check_invariants(cache, (x.reshape(-1, K).abs() > t).any(0))


def test_op_prefill_resets_then_decode_copies_all():
    N, K, t = 8, 30, 0.5
    W = torch.randn(N, K)
    x = torch.randn(1, 1, K)
    cached_ops.cached_sparse_linear(x, W, None, t, 5)
    cached_ops.cached_sparse_linear(x, W, None, t, 5)
    cache = cached_ops.get_cache(5, W)
    assert cache.rows_copied_last == 0  # same mask: nothing to copy
    cached_ops.cached_sparse_linear(torch.randn(1, cached_ops.CACHE_MAX_ROWS + 1, K), W, None, t, 5)
    assert cache.n == 0
    cached_ops.cached_sparse_linear(x, W, None, t, 5)
    assert cache.rows_copied_last == int((x.abs() > t).sum())
    cached_ops.reset_all()
    assert cache.n == 0
    mem = cached_ops.registry_nbytes()
    assert mem["sites"] == 1 and mem["prepared_weights"] == N * K * 4
    assert mem["total"] == mem["cache"] + mem["prepared_weights"]


def test_op_rebuilds_when_weight_changes():
    W = torch.randn(6, 12)
    x = torch.randn(1, 12)
    cached_ops.cached_sparse_linear(x, W, None, 0.0, 9)
    with torch.no_grad():
        W.mul_(2.0)  # in-place update bumps the version: stale rows must not be served
    y = cached_ops.cached_sparse_linear(x, W, None, 0.0, 9)
    torch.testing.assert_close(y, x @ W.t())


def test_op_opcheck_and_capacity_fraction(monkeypatch):
    """Schema and fake tensor checks; a capacity below K overflows to an exact uncached gather."""
    W = torch.randn(7, 40)
    b = torch.randn(7)
    for M in (1, 3, cached_ops.CACHE_MAX_ROWS + 1):
        torch.library.opcheck(
            torch.ops.actsparse.cached_sparse_linear.default,
            (torch.randn(M, 40), W, b, 0.4, 11),
            test_utils=("test_schema", "test_faketensor"),
        )
    cached_ops.release_all()
    monkeypatch.setattr(cached_ops, "CAPACITY_FRACTION", 0.5)
    g = torch.Generator().manual_seed(2)
    for scale in (0.1, 3.0, 0.1):  # few active channels, then most of them (overflow), then few
        x = torch.randn(1, 40, generator=g) * scale
        y = cached_ops.cached_sparse_linear(x, W, b, 0.3, 12)
        torch.testing.assert_close(y, cached_sparse_linear_reference(x, W, b, 0.3))
    cache = cached_ops.get_cache(12, W)
    assert cache.capacity == 20 and cache.overflows == 1


def test_op_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    N, K, t = 24, 40, 0.5
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)

    def step(x, w, b, site: int):
        h = torch.ops.actsparse.cached_sparse_linear(x, w, b, t, site)
        return torch.relu(h) * 2.0

    compiled = torch.compile(lambda x, w, b: step(x, w, b, 100), fullgraph=True)
    R = cached_ops.CACHE_MAX_ROWS
    shapes = [(1, 1)] * 5 + [(1, R + 4)] + [(1, 1)] * 4 + [(2, 1)] * 2
    for x in _decode_inputs(K, len(shapes), 1, shapes):
        yc = compiled(x, W, b)
        ye = step(x, W, b, 101)  # eager, its own site
        assert yc.shape == ye.shape
        torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
        ref = torch.relu(cached_sparse_linear_reference(x, W, b, t)) * 2.0
        torch.testing.assert_close(yc, ref, rtol=1e-5, atol=1e-5)
    c, e = cached_ops.get_cache(100, W), cached_ops.get_cache(101, W)
    assert c.steps == e.steps == 11 and c.rows_copied_total == e.rows_copied_total
