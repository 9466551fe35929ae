"""The CPU paths of the actsparse ops equal their pure-torch references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.compiler.layout import to_input_major
import actsparse.ops.dense as dense_mod
import actsparse.ops.sparse_linear as sparse_linear_mod
from actsparse.ops.limits import CPU_SPARSE_MAX_ROWS
from actsparse.ops.reference import gated_mlp_reference, sparse_linear_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _assert_close(got, ref, dtype):
    scale = ref.float().abs().max().item() + 1e-6
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * scale + TOL[dtype], f"err {err} scale {scale}"


def _weight(n, k, dtype, layout, gen):
    w = torch.randn(n, k, generator=gen).to(dtype) / k**0.5
    if layout == "input-major":
        w = torch.nn.Parameter(w, requires_grad=False)
        to_input_major(w)
        w = w.data
    return w


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 40), ns=st.lists(st.integers(1, 24), min_size=1, max_size=3),
       dtype=st.sampled_from(list(TOL)), layout=st.sampled_from(["row-major", "input-major"]),
       bias=st.booleans(), per_token=st.booleans(), lead3=st.booleans(),
       ts=st.lists(st.sampled_from([0.0, 0.3, 0.8, 1.5, 1e9]), min_size=3, max_size=3),
       seed=st.integers(0, 2**16))
def test_sparse_linear_matches_reference(rows, k, ns, dtype, layout, bias, per_token, lead3, ts, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    if lead3:
        x = x.reshape(1, rows, k)
    ws = [_weight(n, k, dtype, layout, gen) for n in ns]
    bs = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in ns]
    thr = ts[: len(ns)]
    got = torch.ops.actsparse.sparse_linear(x, ws, bs, thr, per_token, 0.5)
    ref = sparse_linear_reference(x, ws, bs, thr, per_token)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        _assert_close(g, r, dtype)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 24), f=st.integers(1, 40), act=st.sampled_from(
    ["silu", "gelu", "gelu_tanh", "relu"]), dtype=st.sampled_from(list(TOL)), bias=st.booleans(),
    t=st.sampled_from([0.0, 0.05, 0.3, 1e9]), per_token=st.booleans(), seed=st.integers(0, 2**16))
def test_gated_mlp_matches_reference(rows, k, f, act, dtype, bias, t, per_token, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, k, generator=gen).to(dtype)
    wg, wu = (torch.randn(f, k, generator=gen).to(dtype) for _ in range(2))
    wd = _weight(k + 3, f, dtype, "input-major", gen)
    bs = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in (f, f, k + 3)]
    got = torch.ops.actsparse.gated_mlp(x, wg, wu, wd, *bs, act, t, per_token, 0.5)
    ref = gated_mlp_reference(x, wg, wu, wd, *bs, act, t, per_token)
    _assert_close(got, ref, dtype)


def test_few_rows_really_gather(monkeypatch):
    """Decode on the CPU multiplies only the active rows: no dense matmul over all of W."""
    calls = []
    real = torch.nn.functional.linear
    for mod in (sparse_linear_mod, dense_mod):
        monkeypatch.setattr(mod.F, "linear", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    x = torch.randn(1, 64)
    w = torch.randn(32, 64)
    torch.ops.actsparse.sparse_linear(x, [w], [None], [float(x.abs().median())], False, 0.5)
    assert calls == []  # gathered path
    torch.ops.actsparse.sparse_linear(torch.randn(CPU_SPARSE_MAX_ROWS + 1, 64), [w], [None], [0.5], False, 0.5)
    assert calls == [(32, 64)]  # many rows: masked dense


def test_nearly_dense_mask_runs_dense(monkeypatch):
    calls = []
    real = torch.nn.functional.linear
    for mod in (sparse_linear_mod, dense_mod):
        monkeypatch.setattr(mod.F, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.ops.actsparse.sparse_linear(torch.randn(1, 64), [torch.randn(8, 64)], [None], [0.0], False, 0.0)
    assert calls == [1]


@pytest.mark.parametrize("fn", ["sparse_linear", "gated_mlp"])
def test_ops_work_under_torch_compile(fn):
    x = torch.randn(2, 3, 16)
    w1, w2 = torch.randn(20, 16), torch.randn(20, 16)
    wd = torch.randn(16, 20)
    if fn == "sparse_linear":
        f = lambda x: torch.ops.actsparse.sparse_linear(x, [w1, w2], [None, None], [0.3, 0.5], False, 0.5)  # noqa: E731
    else:
        f = lambda x: torch.ops.actsparse.gated_mlp(x, w1, w2, wd, None, None, None, "silu", 0.1, False, 0.5)  # noqa: E731
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x)
    ref = f(x)
    for g, r in zip(got if isinstance(got, list) else [got], ref if isinstance(ref, list) else [ref]):
        torch.testing.assert_close(g, r)


def test_gated_mlp_cpu_down_reads_input_major_in_place(monkeypatch):
    """Few rows on the CPU: the down projection goes through the input-sparse linear path (the
    native kernel where built) on the full-width activation, not a gathered copy."""
    import actsparse.ops.gated_mlp as gm

    seen = []
    real = gm.cpu_linear
    monkeypatch.setattr(gm, "cpu_linear", lambda h, w, *a: seen.append(h.shape) or real(h, w, *a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 16, generator=gen)
    wg, wu = (torch.randn(32, 16, generator=gen) for _ in range(2))
    wd = _weight(16, 32, torch.float32, "input-major", gen)
    got = torch.ops.actsparse.gated_mlp(x, wg, wu, wd, None, None, None, "relu", 0.0, False, 0.5)
    assert seen == [(1, 32)]
    _assert_close(got, gated_mlp_reference(x, wg, wu, wd, None, None, None, "relu", 0.0, False), torch.float32)


def test_gated_mlp_cpu_up_reads_rows_in_place(monkeypatch):
    """Few rows on the CPU: the up projection of the active neurons goes through the native
    output-sparse kernel (where built) instead of a gathered copy of their rows."""
    import actsparse.ops.gated_mlp as gm

    if gm.native.load() is None:
        pytest.skip("native CPU kernel could not be built")
    seen = []
    real = gm.native.output_sparse_linear
    monkeypatch.setattr(gm.native, "output_sparse_linear",
                        lambda x, w, idx: seen.append(idx.numel()) or real(x, w, idx))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, generator=gen)
    wg, wu = (torch.randn(32, 16, generator=gen) for _ in range(2))
    wd = _weight(16, 32, torch.float32, "input-major", gen)
    bs = [torch.randn(n, generator=gen) for n in (32, 32, 16)]
    got = torch.ops.actsparse.gated_mlp(x, wg, wu, wd, *bs, "relu", 0.0, False, 0.5)
    assert len(seen) == 1 and 0 < seen[0] < 32
    _assert_close(got, gated_mlp_reference(x, wg, wu, wd, *bs, "relu", 0.0, False), torch.float32)
