"""Every dispatch branch of every op, forced, equals the one reference (actsparse/ops/reference.py).

``dispatch.forced(path)`` takes "triton" (CPU tensors run under Triton's interpreter),
"cpu" (native kernel or gather path) or "dense" (the masked dense form). Each test also spies
on the branch functions, so a forced path that silently fell through to another one fails.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import actsparse.ops.gated_mlp as gated_mod
import actsparse.ops.predicted_mlp as predicted_mod
import actsparse.ops.sparse_linear as sparse_mod
from actsparse.compiler.layout import to_input_major
from actsparse.kernels import cpu as native
from actsparse.kernels import triton as tk
from actsparse.ops import constants, dispatch
from actsparse.ops.limits import CPU_SPARSE_MAX_ROWS, GPU_SPARSE_MAX_ROWS
from actsparse.ops.reference import (activation, gated_mlp_reference, predicted_mask, predicted_mlp_reference,
                                     sparse_linear_reference, wina_cutoffs)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = list(TOL)
ROWS = (1, 3, 16)
PATHS = ("triton", "cpu", "dense")
HAS_TRITON = tk.is_available() and tk.interpreting() or torch.cuda.is_available()

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _params(paths=PATHS):
    return [pytest.param(p, marks=needs_triton) if p == "triton" else p for p in paths]


def _gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters (stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _clear_threshold(values: torch.Tensor, per_token: bool, lo: float = 0.3, hi: float = 0.9) -> float:
    """A threshold between the ``lo`` and ``hi`` quantiles of ``|v|`` (per token: ``|v| / mean|row|``)
    in the widest relative gap between values, so that a mask compared on a low-precision gate (the
    masked dense form runs the gate matmul in the input's dtype) agrees with the fp32 reference's."""
    mag = values.float().abs()
    if per_token:
        mag = mag / mag.mean(-1, keepdim=True)
    mag = mag.flatten().sort().values
    n = mag.numel()
    window = mag[int(lo * n): max(int(hi * n), int(lo * n) + 2)].clamp_min(1e-6)
    ratio = window[1:] / window[:-1]
    i = int(ratio.argmax())
    assert ratio[i] > 1.02, f"values too dense for a clear threshold ({float(ratio[i])})"
    return float((window[i] * window[i + 1]).sqrt())


def _close(got, ref, dtype):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape, got.dtype, ref.dtype)
    scale = ref.float().abs().max().item() + 1e-6
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * scale + TOL[dtype], f"err {err} scale {scale}"


def _weight(n, k, dtype, input_major, gen, scale=True):
    w = torch.randn(n, k, generator=gen)
    if scale:
        w = w / k**0.5
    w = w.to(dtype)
    if input_major:
        p = torch.nn.Parameter(w, requires_grad=False)
        to_input_major(p)
        w = p.data
    return w


class Spy:
    """Counts calls of module-level functions (the dispatch branches) without changing them."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        self.mp = monkeypatch

    def on(self, module, name, label=None, taken=lambda result: True):
        """``taken``: which results count as the branch taken (a helper that may decline by
        returning None counts only when it did the work)."""
        real = getattr(module, name)
        label = label or name

        def wrapper(*a, **k):
            result = real(*a, **k)
            if taken(result):
                self.calls[label] = self.calls.get(label, 0) + 1
            return result

        self.mp.setattr(module, name, wrapper)

    def __getitem__(self, label):
        return self.calls.get(label, 0)

    def reset(self):
        self.calls.clear()


@pytest.fixture
def spy(monkeypatch):
    s = Spy(monkeypatch)
    s.on(sparse_mod, "cpu_linear")
    s.on(sparse_mod, "masked_linears")
    s.on(sparse_mod, "gather_rows")
    s.on(native, "input_sparse_linear", "native")
    s.on(gated_mod, "masked_gated_mlp")
    s.on(gated_mod, "up_down_gathered", "gated_gather")
    s.on(predicted_mod, "masked_predicted_mlp")
    s.on(predicted_mod, "masked_mlp_gathered", "predicted_gather", taken=lambda r: r is not None)
    if HAS_TRITON:
        sg = dispatch.triton_module("sparse_gemv")
        gm = dispatch.triton_module("gated_mlp")
        s.on(sg, "launch_sparse_linear", "triton_linear")
        s.on(gm, "launch_gated_mlp", "triton_gated")
    return s


def _expect_linear_branch(spy, path, rows, input_major, dtype_same=True):
    if path == "triton":
        assert spy["triton_linear"] == 1 and spy["cpu_linear"] == 0 and spy["masked_linears"] == 0, spy.calls
    elif path == "cpu":
        assert spy["cpu_linear"] >= 1 and spy["masked_linears"] == 0 and spy["triton_linear"] == 0, spy.calls
        if input_major and native.load() is not None and dtype_same:
            assert spy["native"] >= 1, spy.calls
        else:
            assert spy["native"] == 0, spy.calls
    else:
        assert spy["masked_linears"] == 1 and spy["cpu_linear"] == 0 and spy["triton_linear"] == 0, spy.calls


# ------------------------------------------------------------------------------ sparse_linear


@pytest.mark.parametrize("path", _params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["fixed", "per_token"])
def test_sparse_linear_every_branch(spy, path, dtype, per_token):
    gen = _gen(path, str(dtype), per_token)
    for i, rows in enumerate(ROWS):
        for input_major in (False, True):
            k = (7, 19, 33)[i]
            ns = [(5, 11, 3)[j] for j in range(1 + (i + input_major) % 3)]  # 1..3 outputs
            bias = (i + input_major) % 2 == 0
            x = torch.randn(1, rows, k, generator=gen).to(dtype)
            ws = [_weight(n, k, dtype, input_major, gen) for n in ns]
            bs = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in ns]
            ts = ([0.5, 1.0, 0.0] if per_token else [0.4, 0.9, 0.1])[: len(ns)]
            spy.reset()
            with dispatch.forced(path):
                got = torch.ops.actsparse.sparse_linear(x, ws, bs, ts, per_token, 0.5)
            ref = sparse_linear_reference(x, ws, bs, ts, per_token)
            assert len(got) == len(ns)
            for g, r in zip(got, ref):
                _close(g, r, dtype)
            _expect_linear_branch(spy, path, rows, input_major)


@pytest.mark.parametrize("path", _params())
def test_sparse_linear_all_masked_and_none_masked(spy, path):
    """Thresholds that mask everything (bias only) and nothing (the plain linear)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, generator=gen)
    w = _weight(4, 9, torch.float32, True, gen)
    b = torch.randn(4, generator=gen)
    with dispatch.forced(path):
        none, every = torch.ops.actsparse.sparse_linear(x, [w, w], [b, b], [0.0, 1e9], False, 0.5)
    torch.testing.assert_close(every, b.expand(3, 4).contiguous())
    x0 = torch.where(x == 0, torch.zeros(()), x)  # |x| > 0: exact zeros are masked, nothing else
    torch.testing.assert_close(none, torch.nn.functional.linear(x0, w, b), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ channel_sparse_linear


@pytest.mark.parametrize("path", _params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_sparse_linear_every_branch(spy, path, dtype):
    gen = _gen(path, str(dtype), "wina")
    scope = constants.ConstantScope()
    try:
        for i, rows in enumerate(ROWS):
            for input_major in (False, True):
                k = (9, 21, 31)[i]
                ns = [(7, 3, 13)[j] for j in range(1 + (i + 2 * input_major) % 3)]
                bias = i % 2 == 1
                x = torch.randn(rows, k, generator=gen).to(dtype)
                ws = [_weight(n, k, dtype, input_major, gen) for n in ns]
                bs = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in ns]
                taus = [wina_cutoffs(w, t) for w, t in zip(ws, (0.3, 0.6, 0.1))]
                key = scope.add("test-wina", *taus)
                spy.reset()
                with dispatch.forced(path):
                    got = torch.ops.actsparse.channel_sparse_linear(x, ws, bs, key, 0.5)
                ref = sparse_linear_reference(x, ws, bs, taus)
                assert len(got) == len(ns)
                for g, r in zip(got, ref):
                    _close(g, r, dtype)
                _expect_linear_branch(spy, path, rows, input_major)
    finally:
        constants.release(tuple(scope.keys))


def test_channel_cutoffs_are_per_channel():
    """A cutoff vector masks channel by channel: inf removes a channel, 0 keeps it."""
    x = torch.tensor([[1.0, 2.0, 3.0]])
    w = torch.eye(3)
    scope = constants.ConstantScope()
    key = scope.add("test-cut", torch.tensor([0.0, float("inf"), 2.5]))
    try:
        for path in ("cpu", "dense"):
            with dispatch.forced(path):
                (y,) = torch.ops.actsparse.channel_sparse_linear(x, [w], [None], key, 0.5)
            torch.testing.assert_close(y, torch.tensor([[1.0, 0.0, 3.0]]))
    finally:
        constants.release(tuple(scope.keys))


# ------------------------------------------------------------------------------ gated_mlp


def gated_mlp_gate(x, wg, bg, act):
    return activation(act, torch.nn.functional.linear(x.float(), wg.float(), None if bg is None else bg.float()))


@pytest.mark.parametrize("path", _params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_mlp_every_branch(spy, path, dtype, act):
    gen = _gen(path, str(dtype), act)
    for i, (rows, bias, per_token) in enumerate(itertools.product(ROWS, (False, True), (False, True))):
        k, f = (11, 29)[i % 2], (13, 19)[i % 2]
        x = torch.randn(rows, k, generator=gen).to(dtype)
        wg = _weight(f, k, dtype, False, gen)
        wu = _weight(f, k, dtype, False, gen)
        wd = _weight(k + 2, f, dtype, i % 3 == 0, gen)
        bs = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in (f, f, k + 2)]
        g = gated_mlp_gate(x, wg, bs[0], act)
        t = _clear_threshold(g, per_token)
        spy.reset()
        with dispatch.forced(path):
            got = torch.ops.actsparse.gated_mlp(x, wg, wu, wd, *bs, act, t, per_token, 0.5)
        ref = gated_mlp_reference(x, wg, wu, wd, *bs, act, t, per_token)
        _close(got, ref, dtype)
        kernel_ok = not per_token
        if path == "triton":
            # the kernel takes biases (shifted ReLU's gate has one) but no per-token cutoffs: the
            # masked dense form then
            assert spy["triton_gated"] == int(kernel_ok), (bias, per_token, spy.calls)
            assert spy["masked_gated_mlp"] == int(not kernel_ok), (bias, per_token, spy.calls)
        elif path == "cpu":
            assert spy["triton_gated"] == 0 and spy["masked_gated_mlp"] + spy["gated_gather"] == 1, spy.calls
        else:
            assert spy["masked_gated_mlp"] == 1 and spy["gated_gather"] == 0 and spy["triton_gated"] == 0


def test_gated_mlp_cpu_gather_path_is_taken(spy):
    """Few active neurons: the CPU path gathers them (it is not the dense fallback)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, generator=gen)
    wg, wu, wd = torch.randn(40, 8, generator=gen), torch.randn(40, 8, generator=gen), torch.randn(8, 40, generator=gen)
    with dispatch.forced("cpu"):
        got = torch.ops.actsparse.gated_mlp(x, wg, wu, wd, None, None, None, "relu", 2.0, False, 0.5)
    assert spy["gated_gather"] == 1 and spy["masked_gated_mlp"] == 0
    _close(got, gated_mlp_reference(x, wg, wu, wd, None, None, None, "relu", 2.0), torch.float32)


# ---------------------------------------------------------------------------- predicted_mlp


@pytest.mark.parametrize("path", _params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_predicted_mlp_every_branch(spy, path, dtype):
    gen = _gen(path, str(dtype), "pred")
    for i, (rows, bias) in enumerate(itertools.product(ROWS, (False, True))):
        k, f = (13, 27)[i % 2], (31, 17)[i % 2]
        x = torch.randn(1, rows, k, generator=gen).to(dtype)
        density = (0.2, 0.6)[i % 2]
        mask = torch.rand(1, rows, f, generator=gen) < density
        wg, wu = (_weight(f, k, dtype, False, gen) for _ in range(2))
        wd = _weight(k, f, dtype, i % 2 == 0, gen)
        bs = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in (f, f, k)]
        spy.reset()
        with dispatch.forced(path):
            got = torch.ops.actsparse.predicted_mlp(x, mask, wg, wu, wd, *bs, "silu", 0.5)
        ref = predicted_mlp_reference(x, mask, wg, wu, wd, *bs, "silu")
        _close(got, ref, dtype)
        if path == "triton":
            assert spy["triton_gated"] == 1 and spy["masked_predicted_mlp"] == 0, spy.calls  # biases included
        elif path == "cpu":
            assert spy["triton_gated"] == 0 and spy["masked_predicted_mlp"] + spy["predicted_gather"] == 1
            if rows == 1 and density < 0.5:  # the union of a few rows' masks is sparse: gathered
                assert spy["predicted_gather"] == 1, spy.calls
        else:
            assert spy["masked_predicted_mlp"] == 1 and spy["predicted_gather"] == 0 and spy["triton_gated"] == 0


# ----------------------------------------------------------------------------- predict_mask


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("topk", [True, False], ids=["topk", "threshold"])
def test_predict_mask_matches_reference(path, dtype, topk):
    gen = _gen(path, str(dtype), topk)
    scope = constants.ConstantScope()
    try:
        for rows in ROWS:
            d, r, n, keep = 15, 3, 21, 5
            w1 = torch.randn(r, d, generator=gen).to(dtype)
            w2 = torch.randn(n, r, generator=gen).to(dtype)
            b2 = torch.randn(n, generator=gen).to(dtype)
            key = scope.add("test-pred", w1, w2, b2)
            x = torch.randn(1, rows, d, generator=gen).to(dtype)
            with dispatch.forced(path):
                got = torch.ops.actsparse.predict_mask(x, key, n, keep, 0.25, topk)
            ref = predicted_mask(x, w1, w2, b2, keep, 0.25, topk)
            assert got.dtype == torch.bool and got.shape == (1, rows, n)
            assert torch.equal(got, ref)
            if topk:
                assert (got.sum(-1) >= keep).all()
    finally:
        constants.release(tuple(scope.keys))


# ---------------------------------------------------------------------------------- policy


@pytest.mark.parametrize("rows", [1, 2, CPU_SPARSE_MAX_ROWS, CPU_SPARSE_MAX_ROWS + 1, 64])
@pytest.mark.parametrize("gated", [False, True])
def test_unforced_cpu_policy(rows, gated):
    x2 = torch.randn(rows, 16)
    path, mod = dispatch.choose(x2, 16, [32], 0.5, 4, gated=gated)
    assert mod is None
    assert path == ("cpu" if rows <= CPU_SPARSE_MAX_ROWS else "dense")


def test_unforced_zero_rows_is_dense():
    assert dispatch.choose(torch.randn(0, 16), 16, [8], 0.5, 4) == ("dense", None)


def test_unforced_cpu_never_takes_triton_even_under_the_interpreter():
    for rows in range(1, GPU_SPARSE_MAX_ROWS + 1):
        assert dispatch.choose(torch.randn(rows, 8), 8, [8], 0.9, 4)[0] != "triton"


@needs_triton
@pytest.mark.parametrize("gated", [False, True])
def test_forced_triton_takes_cpu_tensors_under_the_interpreter(gated):
    for rows in (1, 2, GPU_SPARSE_MAX_ROWS):
        with dispatch.forced("triton"):
            path, mod = dispatch.choose(torch.randn(rows, 8), 8, [8], 0.5, 4, gated=gated)
        assert path == "triton" and mod is not None
        assert mod.__name__.endswith("gated_mlp" if gated else "sparse_gemv")
    with dispatch.forced("triton"):  # more rows than the kernels take: dense
        assert dispatch.choose(torch.randn(GPU_SPARSE_MAX_ROWS + 1, 8), 8, [8], 0.5, 4)[0] == "dense"


def test_forced_cpu_and_dense():
    for rows in (1, CPU_SPARSE_MAX_ROWS + 1, 40):
        with dispatch.forced("cpu"):
            assert dispatch.choose(torch.randn(rows, 8), 8, [8], 0.5, 4) == ("cpu", None)
        with dispatch.forced("dense"):
            assert dispatch.choose(torch.randn(rows, 8), 8, [8], 0.5, 4) == ("dense", None)
    with dispatch.forced("cpu"):
        assert dispatch.choose(torch.randn(0, 8), 8, [8], 0.5, 4) == ("dense", None)


def test_forced_nests_and_restores():
    with dispatch.forced("dense"):
        with dispatch.forced("cpu"):
            assert dispatch.choose(torch.randn(40, 8), 8, [8], 0.5, 4)[0] == "cpu"
        assert dispatch.choose(torch.randn(1, 8), 8, [8], 0.5, 4)[0] == "dense"
    assert dispatch.choose(torch.randn(1, 8), 8, [8], 0.5, 4)[0] == "cpu"
    with pytest.raises(ValueError, match="triton"):
        with dispatch.forced("gpu"):
            pass
