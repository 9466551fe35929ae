"""Head-sparse flash-decoding kernel against its pure-torch reference, in Triton's interpreter.

Small odd shapes (context tails, S = 1, splits with no block), MHA / GQA / multi-query, units
of a whole KV group and of one head, every mask form (none, bool, additive float; head dim 1
or Hq; batch dim 1 or B), blocks the mask excludes (their K/V hold NaN, so a read would show),
1 and several splits, both query-row paths and both block-skipping modes. The output and the
workspace are filled with NaN before each run: every output element must be written, and the
combine must read only partials the split kernel wrote.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from actsparse.ops.reference import head_sparse_attention_reference as reference  # noqa: E402
from actsparse.kernels.triton import head_attention as ha  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the Triton interpreter on CPU tensors")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# Interpreter-sized configs that force every branch: tl.dot / register rows (USE_DOT),
# straight predicated loop / branch per block (SKIP_BRANCH), attended-span trimming off, per
# split, or whole row rebalanced over the splits (TRIM 0/1/2, used only with a mask), and a
# scan step short enough to take several steps with a tail (SCAN_BLOCK).
DOT = dict(USE_DOT=True, BLOCK_S=16, SKIP_BRANCH=False, TRIM=2, SCAN_BLOCK=32, num_warps=4)
FMA = dict(USE_DOT=False, BLOCK_S=16, SKIP_BRANCH=True, TRIM=1, SCAN_BLOCK=16, num_warps=4)
DOT_BRANCH = dict(USE_DOT=True, BLOCK_S=32, SKIP_BRANCH=True, TRIM=0, num_warps=4)
FMA_PRED = dict(USE_DOT=False, BLOCK_S=32, SKIP_BRANCH=False, TRIM=2, SCAN_BLOCK=16, num_warps=4)
CONFIGS = [DOT, FMA, DOT_BRANCH, FMA_PRED]
IDS = ["dot-trim2", "fma-branch-trim1", "dot-branch-notrim", "fma-trim2"]


@pytest.fixture(autouse=True)
def nan_workspace(monkeypatch):
    """Partials start as NaN: a combine that read an entry nobody wrote would return NaN."""
    monkeypatch.setattr(ha, "_workspace",
                        lambda n, dev: torch.full((max(int(n), 1),), float("nan"), dtype=torch.float32, device=dev))


def assert_close(out, ref, dtype):
    """fp32-accumulated results rounded to dtype: a couple of ulps of the output's scale."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any(), "an output element was not written"
    scale = float(ref.float().abs().max()) + 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * EPS[dtype], atol=2 * EPS[dtype] * scale)


def selection(B, n_units, n_sel, g, dtype=torch.int64):
    """n_sel distinct units per row, in random order."""
    return torch.stack([torch.randperm(n_units, generator=g)[:n_sel] for _ in range(B)]).to(dtype)


def make_mask(kind, B, Hq, S, g, heads=1, batch=None, dtype=torch.float32, valid_len=None):
    """kind: None, "bool", "float" (random bias with -inf holes) or "hf" (0 / dtype minimum).
    valid_len: per batch row, only the first valid_len[b] positions attended (a static cache);
    with several mask heads, head h attends the first (h % 3) * valid_len[b] // 2 positions:
    heads of one unit differ, and every third head attends nothing."""
    if kind is None:
        return None
    batch = B if batch is None else batch
    attend = torch.rand(batch, heads, 1, S, generator=g) > 0.3
    if valid_len is not None:
        lens = torch.tensor(valid_len[:batch]).view(batch, 1, 1, 1).expand(batch, heads, 1, 1)
        if heads > 1:
            lens = lens * (torch.arange(heads) % 3).view(1, heads, 1, 1) // 2
        attend = attend & (torch.arange(S).view(1, 1, 1, S) < lens)
        attend[..., 0] |= lens[..., 0] > 0  # each non-empty head attends its first position
    if kind == "bool":
        return attend
    if kind == "hf":
        return torch.where(attend, 0.0, torch.finfo(dtype).min).to(dtype)
    bias = torch.randn(batch, heads, 1, S, generator=g)
    return torch.where(attend, bias, float("-inf")).to(dtype)


def poison_unattended(k, v, mask, B, S):
    """NaN into K/V at positions no head of the sequence attends: they must never be read."""
    if mask is None:
        return k, v
    if mask.dtype == torch.bool:
        attend = mask
    else:
        attend = mask.float() > torch.finfo(mask.dtype).min
    none = ~attend.expand(B, -1, 1, S).any(dim=1)[:, 0]  # [B, S]
    k, v = k.clone(), v.clone()
    k[none[:, None, :, None].expand_as(k)] = float("nan")
    v[none[:, None, :, None].expand_as(v)] = float("nan")
    return k, v


def inputs(B, Hkv, G, S, D, Dv, dtype, g, strided=False):
    Hq = Hkv * G
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    if strided:  # views of larger buffers, as a static cache and a transposed projection give
        q = torch.randn(B, 1, Hq, 2 * D, generator=g).to(dtype)[..., :D].transpose(1, 2)
        k = torch.randn(B, S + 5, Hkv, D, generator=g).to(dtype)[:, 2:S + 2].transpose(1, 2)
        v = torch.randn(B, Hkv, S + 3, 2 * Dv, generator=g).to(dtype)[:, :, 1:S + 1, ::2]
    else:
        k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, S, Dv, generator=g).to(dtype)
    return q, k, v


def run_case(B=2, Hkv=2, G=4, hpu=None, n_sel=1, S=37, D=16, Dv=16, dtype=torch.float32, mask=None,
             mask_heads=1, mask_batch=None, mask_dtype=torch.float32, valid_len=None, n_splits=1,
             config=DOT, seed=0, strided=False, idx_dtype=torch.int64, idx_3d=False, poison=True):
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * G
    hpu = G if hpu is None else hpu
    q, k, v = inputs(B, Hkv, G, S, D, Dv, dtype, g, strided)
    am = make_mask(mask, B, Hq, S, g, heads=mask_heads, batch=mask_batch, dtype=mask_dtype, valid_len=valid_len)
    idx = selection(B, Hq // hpu, n_sel, g, idx_dtype)
    if idx_3d:
        idx = idx[:, None, :]
    scale = D**-0.5
    ref = reference(q, k, v, am, idx, hpu, scale)
    kp, vp = poison_unattended(k, v, am, B, S) if poison else (k, v)
    out = torch.full((B, Hq, 1, Dv), float("nan"), dtype=dtype)
    assert ha.supports(q, kp, vp, am, hpu)
    res = ha.launch_head_sparse_decode(q, kp, vp, am, idx, hpu, scale, config=config, n_splits=n_splits, out=out)
    assert res is out
    assert_close(out, ref, dtype)
    # unselected heads exactly 0
    sel = torch.zeros(B, Hq // hpu, dtype=torch.bool)
    sel.scatter_(1, idx.reshape(B, -1).long(), True)
    off = ~sel.repeat_interleave(hpu, dim=1)
    assert (out[off] == 0).all()
    return out, ref


# ----------------------------------------------------------------------------------------------
# Kernel vs reference
# ----------------------------------------------------------------------------------------------

# (B, Hkv, G, hpu, n_sel, S, D, Dv, mask, mask_heads, mask_batch, n_splits, config)
GRID = [
    (1, 2, 4, 4, 1, 37, 16, 16, None, 1, None, 1, DOT),        # GQA, unit = KV group
    (3, 2, 4, 4, 2, 100, 16, 32, None, 1, None, 3, FMA),       # all units, Dv != D, 3 splits
    (3, 4, 1, 1, 3, 37, 32, 16, "bool", 1, None, 2, DOT),      # MHA
    (1, 1, 4, 1, 4, 37, 16, 16, "bool", 4, None, 2, FMA),      # multi-query, unit = one head, per-head mask
    (3, 1, 3, 3, 1, 100, 16, 16, "float", 1, 1, 4, DOT_BRANCH),  # multi-query, G=3 (padded rows), mask batch 1
    (3, 2, 3, 1, 5, 100, 16, 16, "float", 6, None, 2, FMA_PRED),  # G=3, unit = one head, per-head float
    (1, 2, 4, 2, 3, 1, 16, 16, None, 1, None, 1, DOT),         # S = 1; unit of 2 heads inside a group
    (3, 2, 2, 2, 1, 37, 32, 32, "hf", 1, None, 5, DOT),        # HF float mask; splits with no block
    (1, 3, 4, 4, 3, 100, 16, 16, "bool", 12, 1, 7, DOT),       # per-head mask, batch 1; 7 splits
]


@pytest.mark.parametrize("case", range(len(GRID)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_grid(case, dtype):
    B, Hkv, G, hpu, n_sel, S, D, Dv, mask, mh, mb, ns, cfg = GRID[case]
    run_case(B, Hkv, G, hpu, n_sel, S, D, Dv, dtype, mask, mh, mb, n_splits=ns, config=cfg, seed=case,
             strided=case % 2 == 1, idx_dtype=torch.int32 if case % 3 == 0 else torch.int64)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("n_splits", [1, 3])
def test_static_cache_skips_unattended_blocks(config, n_splits):
    """A cache of 100 slots holding a few tokens per sequence: most blocks are fully masked
    (their K/V are NaN) and must be skipped; row 1 attends only its first 3 positions, row 2
    nothing at all (output 0)."""
    run_case(B=3, Hkv=2, G=3, n_sel=2, S=100, mask="bool", valid_len=[40, 3, 0], n_splits=n_splits,
             config=config, dtype=torch.bfloat16, seed=11)
    run_case(B=3, Hkv=2, G=3, hpu=1, n_sel=4, S=100, mask="hf", mask_dtype=torch.bfloat16, valid_len=[67, 3, 0],
             n_splits=n_splits, config=config, dtype=torch.bfloat16, seed=12)


@pytest.mark.parametrize("config", [DOT, FMA, DOT_BRANCH], ids=IDS[:3])
def test_per_head_prefix_masks(config):
    """Heads of one unit attend different prefixes (some none): a block is read while any head
    of the unit attends it, and a head with nothing attended outputs 0."""
    out, ref = run_case(B=2, Hkv=2, G=4, n_sel=2, S=100, mask="bool", mask_heads=8, valid_len=[50, 9],
                        n_splits=2, config=config, dtype=torch.float16, seed=21)
    assert (out[:, 0::3] == 0).all()  # heads attending nothing
    assert (out[:, 1::3] != 0).any(dim=-1).all()  # the others, all selected, attend something


@pytest.mark.parametrize("trim", [0, 1, 2])
@pytest.mark.parametrize("skip_branch", [False, True])
def test_trim_modes_with_holes_and_left_padding(trim, skip_branch):
    """Attended positions in two runs with a masked hole between them and a masked (left-padded)
    start: every trimming mode, with and without the branch per block, gives the reference."""
    g = torch.Generator().manual_seed(31 + trim)
    B, Hkv, G, S = 2, 2, 2, 100
    q, k, v = inputs(B, Hkv, G, S, 16, 16, torch.float16, g)
    pos = torch.arange(S)
    am = torch.stack([((pos >= 5) & (pos < 20)) | ((pos >= 70) & (pos < 90)),
                      (pos >= 33) & (pos < 34)]).view(B, 1, 1, S)
    idx = torch.tensor([[1, 3], [2, 0]])
    kp, vp = poison_unattended(k, v, am, B, S)
    cfg = dict(USE_DOT=True, BLOCK_S=16, SKIP_BRANCH=skip_branch, TRIM=trim, SCAN_BLOCK=16, num_warps=4)
    for n_splits in (1, 3):
        out = ha.launch_head_sparse_decode(q, kp, vp, am, idx, 1, 0.25, config=cfg, n_splits=n_splits)
        assert_close(out, reference(q, k, v, am, idx, 1, 0.25), torch.float16)


@pytest.mark.parametrize("config", [FMA, DOT_BRANCH, DOT], ids=[IDS[1], IDS[2], IDS[0]])
def test_last_split_past_the_context(config):
    """S = 17 in blocks of 16 over 3 splits: the last split starts past S. (Found by the
    property test: with TRIM=1 an empty split once re-read block 1.)"""
    run_case(B=1, Hkv=1, G=1, hpu=1, n_sel=1, S=17, mask="bool", n_splits=3, config=config, seed=0, strided=True)


def test_fully_masked_everything_is_zero():
    g = torch.Generator().manual_seed(3)
    q, k, v = inputs(2, 2, 2, 37, 16, 16, torch.float32, g)
    am = torch.zeros(2, 1, 1, 37, dtype=torch.bool)
    idx = torch.tensor([[0, 1], [1, 0]])
    out = ha.launch_head_sparse_decode(q, k, v, am, idx, 2, 0.25, config=DOT, n_splits=2)
    assert (out == 0).all()


def test_unit_idx_forms_and_defaults():
    """[B, 1, n_sel] selection, int32, a non-contiguous index view; the default config and
    split count (under the interpreter) give the same result."""
    run_case(B=3, Hkv=2, G=4, hpu=1, n_sel=3, S=37, mask="bool", idx_3d=True, idx_dtype=torch.int32,
             n_splits=None, config=None, seed=5)
    g = torch.Generator().manual_seed(6)
    q, k, v = inputs(2, 2, 4, 37, 16, 16, torch.float32, g)
    wide = torch.tensor([[5, 9, 1, 9], [2, 9, 7, 9]])  # column 0 and 2: a strided [B, 2] view
    idx = wide[:, ::2]
    out = ha.launch_head_sparse_decode(q, k, v, None, idx, 1, 0.25)
    assert_close(out, reference(q, k, v, None, idx, 1, 0.25), torch.float32)


def test_mixed_mask_dtype_and_additive_values():
    """An fp32 additive mask (real biases, -inf holes) with bf16 q/k/v."""
    run_case(B=3, Hkv=1, G=4, n_sel=1, S=100, dtype=torch.bfloat16, mask="float", mask_heads=4,
             mask_dtype=torch.float32, n_splits=2, config=FMA, seed=8)


def test_no_selection_writes_zeros():
    g = torch.Generator().manual_seed(9)
    q, k, v = inputs(2, 2, 2, 37, 16, 16, torch.bfloat16, g)
    out = torch.full((2, 4, 1, 16), float("nan"), dtype=torch.bfloat16)
    ha.launch_head_sparse_decode(q, k, v, None, torch.zeros(2, 0, dtype=torch.int64), 2, 0.25, config=DOT, out=out)
    assert (out == 0).all()


# No shrinking: under the interpreter it takes minutes; a failure prints its example anyway.
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))


@SETTINGS
@given(B=st.integers(1, 3), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 3, 4]),
       per_head=st.booleans(), sel_frac=st.floats(0.0, 1.0), S=st.integers(1, 80),
       D=st.sampled_from([16, 32]), dtype=st.sampled_from(DTYPES),
       mask=st.sampled_from([None, "bool", "float", "hf"]), mask_heads_full=st.booleans(),
       mask_batch_one=st.booleans(), n_splits=st.integers(1, 4), config=st.sampled_from(range(len(CONFIGS))),
       seed=st.integers(0, 2**16))
def test_random(B, Hkv, G, per_head, sel_frac, S, D, dtype, mask, mask_heads_full, mask_batch_one, n_splits,
                config, seed):
    hpu = 1 if per_head else G
    n_units = Hkv * G // hpu
    n_sel = max(1, round(sel_frac * n_units))
    run_case(B, Hkv, G, hpu, n_sel, S, D, D, dtype, mask, mask_heads=Hkv * G if mask_heads_full else 1,
             mask_batch=1 if mask_batch_one else None, mask_dtype=dtype, n_splits=n_splits,
             config=CONFIGS[config], seed=seed, strided=seed % 2 == 0)


# ----------------------------------------------------------------------------------------------
# Host side: supports, split count, config pruning
# ----------------------------------------------------------------------------------------------


def test_supports():
    g = torch.Generator().manual_seed(0)
    q, k, v = inputs(2, 2, 4, 37, 16, 16, torch.bfloat16, g)
    assert ha.supports(q, k, v, None, 4) and ha.supports(q, k, v, None, 1) and ha.supports(q, k, v, None, 2)
    assert not ha.supports(q, k, v, None, 3)  # a unit would straddle two KV heads
    assert not ha.supports(q, k, v, None, 8)
    assert not ha.supports(q.float(), k, v, None, 4)  # mixed dtypes
    assert not ha.supports(q[..., :8], k[..., :8], v, None, 4)  # D < 16
    q24, k24 = torch.randn(2, 8, 1, 24), torch.randn(2, 2, 37, 24)
    assert not ha.supports(q24, k24, v.float(), None, 4)  # D not a power of two
    assert not ha.supports(torch.cat([q, q], dim=2), k, v, None, 4)  # Lq = 2
    assert not ha.supports(q.to(torch.int8), k.to(torch.int8), v.to(torch.int8), None, 4)
    assert ha.supports(q, k, v, torch.ones(2, 8, 1, 37, dtype=torch.bool), 4)
    assert ha.supports(q, k, v, torch.zeros(1, 1, 1, 37), 4)
    assert not ha.supports(q, k, v, torch.ones(2, 3, 1, 37, dtype=torch.bool), 4)  # head dim 3
    assert not ha.supports(q, k, v, torch.ones(2, 1, 1, 36, dtype=torch.bool), 4)  # wrong length
    assert not ha.supports(q, k, v, torch.ones(2, 1, 1, 37, dtype=torch.int32), 4)


def test_choose_splits():
    assert ha.choose_splits(1, 1, 16384, 132) == ha.MAX_SPLITS  # few programs, long context
    assert ha.choose_splits(1, 8, 16384, 132) == 50  # 400 programs: ~3 per SM
    assert ha.choose_splits(1, 8, 1024, 132) == 1024 // ha.MIN_SPLIT_LEN  # splits stay long
    assert ha.choose_splits(64, 4, 4096, 132) == 2  # 512 programs: ~3.9 per SM
    assert ha.choose_splits(64, 32, 4096, 132) == 1  # plenty of programs already
    assert ha.choose_splits(4, 2, 100, 132) == 1  # short context
    for B, n, S in [(1, 1, 1), (8, 8, 8192), (256, 8, 32768), (2, 1, 300)]:
        ns = ha.choose_splits(B, n, S, 132)
        assert 1 <= ns <= ha.MAX_SPLITS and (ns == 1 or S // ns >= ha.MIN_SPLIT_LEN)


def test_prune_drops_long_blocks_and_spilling_register_tiles():
    kept = ha._prune(ha.CONFIGS, {"S_KEY": 20}, ROWS_FMA=4, D=128, DV=128)
    assert kept and all(c.kwargs["BLOCK_S"] <= 32 for c in kept)
    kept = ha._prune(ha.CONFIGS, {"S_KEY": 4096}, ROWS_FMA=4, D=128, DV=128)
    assert kept and all(c.kwargs["USE_DOT"] for c in kept)  # 4 rows x 32 x 128 is too many registers
    assert any(not c.kwargs["USE_DOT"] for c in ha._prune(ha.CONFIGS, {"S_KEY": 4096}, ROWS_FMA=1, D=128, DV=128))
    big = ha._prune(ha.CONFIGS, {"S_KEY": 4096, "K": torch.empty(1, dtype=torch.bfloat16)}, ROWS_FMA=1, D=256, DV=256)
    assert big and all(c.num_stages * c.kwargs["BLOCK_S"] * 512 * 2 <= ha._SMEM_LIMIT for c in big)
    assert 4 <= len(ha.CONFIGS) <= 8
    assert {c.kwargs["BLOCK_S"] for c in ha.CONFIGS} == {32, 64, 128}
    ha._tuned_kernel()  # the autotuner checks that every key names a kernel argument


# ----------------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Hkv,G,Lq", [(2, 4, 1), (4, 1, 3), (1, 3, 2)])
def test_reference_all_selected_is_sdpa(Hkv, G, Lq):
    g = torch.Generator().manual_seed(Hkv * 10 + G)
    B, S, D = 2, 23, 16
    Hq = Hkv * G
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, 32, generator=g)
    idx = torch.arange(Hkv).repeat(B, Lq, 1)  # every KV group, per token
    got = reference(q, k, v, None, idx, G, 0.3)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # bool and HF-style float masks with some positions attended match SDPA too
    am = torch.rand(B, 1, Lq, S, generator=g) > 0.5
    am[..., 0] = True
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=am,
                                          scale=0.3)
    torch.testing.assert_close(reference(q, k, v, am, idx, G, 0.3), want, rtol=1e-5, atol=1e-5)
    fm = torch.where(am, 0.0, torch.finfo(torch.float32).min)
    torch.testing.assert_close(reference(q, k, v, fm, idx, G, 0.3), want, rtol=1e-5, atol=1e-5)


def test_reference_subset_zeroes_unselected_heads():
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, Lq, S, D = 2, 2, 4, 2, 19, 16
    Hq = Hkv * G
    q = torch.randn(B, Hq, Lq, D, generator=g).to(torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, generator=g).to(torch.bfloat16)
    v = torch.randn(B, Hkv, S, D, generator=g).to(torch.bfloat16)
    full = reference(q, k, v, None, torch.arange(Hq).repeat(B, Lq, 1), 1, 0.25)
    idx = torch.tensor([[[0, 5, 6], [7, 1, 2]], [[3, 4, 0], [6, 2, 1]]])  # per token, unit = one head
    got = reference(q, k, v, None, idx, 1, 0.25)
    for b in range(B):
        for t in range(Lq):
            for h in range(Hq):
                if h in idx[b, t].tolist():
                    assert torch.equal(got[b, h, t], full[b, h, t])
                else:
                    assert (got[b, h, t] == 0).all()
    # [B, n_sel] and [B, 1, n_sel] agree at Lq = 1
    idx1 = torch.tensor([[1], [0]])
    a = reference(q[:, :, :1], k, v, None, idx1, G, 0.25)
    torch.testing.assert_close(a, reference(q[:, :, :1], k, v, None, idx1[:, None], G, 0.25), rtol=0, atol=0)
    assert (a[0, :4] == 0).all() and (a[0, 4:] != 0).any() and (a[1, 4:] == 0).all()


def test_reference_fully_masked_row_is_zero():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 1, 16, generator=g)
    k, v = torch.randn(1, 1, 5, 16, generator=g), torch.randn(1, 1, 5, 16, generator=g)
    for am in (torch.zeros(1, 1, 1, 5, dtype=torch.bool), torch.full((1, 1, 1, 5), float("-inf")),
               torch.full((1, 1, 1, 5), torch.finfo(torch.float16).min, dtype=torch.float16)):
        out = reference(q, k, v, am, torch.tensor([[0]]), 2, 0.25)
        assert (out == 0).all() and not torch.isnan(out).any()
