"""The quantized sparse GEMV (int8, int4) against its pure-torch reference, in Triton's CPU interpreter.

Odd shapes (tails in K and in the outputs, several K chunks so the split-K atomics combine),
batch 1 (FMA path) and a few rows (dot path), masks from dense to all-zero, per-row scales,
biases, fp32 and bf16 inputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from actsparse.kernels.triton import quant_gemv as qg  # noqa: E402
from actsparse.ops.reference import quant_sparse_linear_reference  # noqa: E402
from actsparse.quant.storage import quantize_int8, quantize_weight  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the Triton interpreter on CPU tensors")

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
CONFIGS = [qg.INTERPRET_CONFIG, dict(BLOCK_N=32, BLOCK_K=32, CHUNK=64, num_warps=4),
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=256, num_warps=4),  # one chunk covers K
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=64, UNROLL=True, num_warps=4),  # unrolled steps
           dict(BLOCK_N=32, BLOCK_K=16, CHUNK=32, UNROLL=True, ONE_GROUP=True, num_warps=4),  # scales per program
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, UNROLL=False, ONE_GROUP=True, num_warps=4),
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, FAST_CVT=True, num_warps=4),  # integers converted by bit tricks
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=64, COMPACT=True, num_warps=4),  # a list of the active channels
           dict(BLOCK_N=32, BLOCK_K=16, CHUNK=64, COMPACT=True, FRAC=True, num_warps=4),  # codes as 1 + u / 2^b
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, COMPACT=True, ONE_GROUP=True, FRAC=True, num_warps=4),
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, UNROLL=True, ONE_GROUP=True, FRAC=True, num_warps=4)]


def threshold_for(x, sparsity):
    if sparsity <= 0:
        return -1.0
    if sparsity >= 1:
        return 1e30
    return float(torch.quantile(x.abs().float().flatten(), sparsity))


def check(m, k, n, bits, group, dtype, sparsity, per_token, bias, config, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / 4).to(dtype)
    grouped = bits == "8g"  # int8 with one scale per group of input channels
    bits = 8 if grouped else bits
    if grouped and group == 16:  # GGUF Q6_K's layout: quantize_weight does not offer it
        qw = quantize_int8(w, 16)
    else:
        qw = quantize_weight(w, bits, group if bits == 4 or grouped else None)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) / 10).to(dtype) if bias else None
    rs = x.float().abs().mean(-1) if per_token else None
    t = threshold_for(x, sparsity) if not per_token else sparsity * 1.5
    out = qg.launch_quant_sparse_linear(x, qw.qweight, qw.scales, qw.offsets, b, t, bits, qw.group_size,
                                        row_scale=rs, config=config)
    ref = quant_sparse_linear_reference(x, qw.qweight, qw.scales, qw.offsets, b, t, False, bits, qw.group_size,
                                        scale=rs)
    assert out.dtype == dtype and out.shape == (m, n)
    scale = float(ref.float().abs().max()) + 1e-6
    eps = 1e-5 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps * scale)


@pytest.mark.parametrize("bits,k,n,group", [(8, 100, 70, 0), (8, 33, 5, 0), (4, 96, 46, 32), (4, 128, 2, 64),
                                            (4, 256, 38, 128), ("8g", 96, 35, 32), ("8g", 128, 6, 64),
                                            ("8g", 80, 22, 16)])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_against_reference(bits, k, n, group, m, sparsity):
    check(m, k, n, bits, group, torch.float32, sparsity, False, True, None, seed=k + n + m)


def _fits(config, bits, group):
    return qg.config_fits({**qg.CONFIG_DEFAULTS, **config}, group if bits in (4, "8g") else 0)


@pytest.mark.parametrize("config,bits", [(c, b) for c in CONFIGS for b in (8, 4, "8g") if _fits(c, b, 32)])
def test_configs(config, bits):
    """Every config kind (ONE_GROUP only where the weights are grouped: its refusal is tested below)."""
    check(2, 128, 34, bits, 32, torch.float32, 0.4, False, True, config, seed=1)
    check(1, 128, 34, bits, 32, torch.float32, 0.4, False, False, config, seed=2)
    check(1, 96, 10, bits, 32, torch.bfloat16, 0.7, True, True, config, seed=3)  # a K tail, per-row scales


@pytest.mark.parametrize("bits", [4, "8g"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["unrolled", "compact"])
def test_one_group_against_reference(bits, sparsity, kind):
    """Scales applied once per program, with whole chunks inactive at high sparsity."""
    cfg = dict(BLOCK_N=16, BLOCK_K=16, CHUNK=64, ONE_GROUP=True, FRAC=True, num_warps=4)
    cfg.update(dict(UNROLL=True, FAST_CVT=True) if kind == "unrolled" else dict(COMPACT=True))
    for m in (1, 5):
        check(m, 256, 38, bits, 128, torch.float32, sparsity, False, True, cfg, seed=m)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), ("8g", 32)])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.97, 1.0])
def test_compact_lists_against_reference(bits, group, sparsity):
    """Lists of every length (none, a partial step, several steps), a K tail, 1 and 4 rows."""
    extra = dict(ONE_GROUP=True) if group else {}
    cfg = dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, COMPACT=True, num_warps=4, **extra)
    k = 96 if group else 90
    for m, frac in ((1, False), (1, True), (4, False)):
        check(m, k, 22, bits, group, torch.float32, sparsity, False, True, {**cfg, "FRAC": frac}, seed=m)
    check(1, k, 22, bits, group, torch.float32, sparsity, True, False, {**cfg, "FRAC": True}, seed=9)


def test_configs_that_do_not_fit_are_refused():
    qw = quantize_weight(torch.randn(8, 64), 4, 32)
    x = torch.randn(1, 64)
    bad = [dict(BLOCK_N=16, BLOCK_K=16, CHUNK=64, ONE_GROUP=True),  # a chunk spans two groups
           dict(BLOCK_N=16, BLOCK_K=64, CHUNK=64),  # a step spans two groups
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, COMPACT=True),  # a list's step may mix groups
           dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, FRAC=True)]  # per-step scales: no constant to remove
    for cfg in bad:
        with pytest.raises(ValueError, match="does not fit group size 32"):
            qg.launch_quant_sparse_linear(x, qw.qweight, qw.scales, qw.offsets, None, 0.1, 4, 32, config=cfg)
    qw8 = quantize_weight(torch.randn(8, 64), 8, None)
    with pytest.raises(ValueError, match="does not fit group size 0"):
        qg.launch_quant_sparse_linear(x, qw8.qweight, qw8.scales, None, None, 0.1, 8, 0,
                                      config=dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, ONE_GROUP=True))


def test_prune_keeps_only_fitting_configs():
    for g in (0, 16, 32, 128):  # 16: GGUF Q6_K's int8 groups, narrower than any ONE_GROUP chunk
        for configs in (qg.CONFIGS_M1, qg.CONFIGS_DOT):  # each path keeps a config that fits
            kept = qg._prune(configs, {"K": 4096, "NC": 4096, "G": g})
            assert kept and all(qg.config_fits(c.kwargs, g) for c in kept)
        kept = qg._prune(qg.CONFIGS_M1 + qg.CONFIGS_DOT, {"K": 4096, "NC": 4096, "G": g})
        assert any(c.kwargs["ONE_GROUP"] for c in kept) == (g >= 32)
    for dtype, frac in ((torch.float32, False), (torch.bfloat16, True)):  # fp32 x keeps every bit
        kept = qg._prune(qg.CONFIGS_M1, {"K": 4096, "NC": 4096, "G": 0, "X": torch.zeros(1, 2, dtype=dtype)})
        assert any(c.kwargs["FRAC"] for c in kept) == frac and any(c.kwargs["COMPACT"] for c in kept)


@SETTINGS
@given(bits=st.sampled_from([8, 4]), m=st.integers(1, 16), groups=st.integers(1, 4), half=st.integers(1, 40),
       sparsity=st.floats(0.0, 1.0), per_token=st.booleans(), bias=st.booleans(),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(bits, m, groups, half, sparsity, per_token, bias, bf16, seed):
    k = 32 * groups if bits == 4 else 32 * groups - 7
    check(m, k, 2 * half, bits, 32, torch.bfloat16 if bf16 else torch.float32, sparsity, per_token, bias,
          None, seed)


def test_skipped_channels_are_not_read():
    """NaN weights on inactive channels do not reach the output: their rows are never loaded."""
    k, n = 64, 16
    for bits, gs in ((8, None), (4, 32), (8, 32)):
        qw = quantize_weight(torch.randn(n, k), bits, gs)
        x = torch.zeros(1, k)
        x[0, 40:44] = 1.0  # only channels 40..43 (group 1) are active
        scales = qw.scales.clone().float()
        if gs and bits == 8:
            scales[0] = float("nan")
            offsets = None
        elif bits == 4:
            scales[0] = float("nan")  # group 0 holds no active channel: its scales are never read
            offsets = qw.offsets.clone().float()
            offsets[0] = float("nan")
        else:
            offsets = None
        out = qg.launch_quant_sparse_linear(x, qw.qweight, scales, offsets, None, 0.5, bits, qw.group_size)
        assert torch.isfinite(out).all()
        ref = quant_sparse_linear_reference(x, qw.qweight, qw.scales.float(), None if offsets is None else
                                            qw.offsets.float(), None, 0.5, False, bits, qw.group_size)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_tuned_configs_are_keyed_by_group_size():
    """A ONE_GROUP config tuned for groups of 128 would be wrong for groups of 32 of the same shape."""
    for m_pad in (1, 16):
        assert "G" in qg._tuned(m_pad).keys


@pytest.mark.parametrize("bits", [8, 4])
def test_fast_conversion_is_exact_over_every_code(bits):
    """Every integer code (int8 -127..127, both nibbles 0..15) converts exactly: an identity-like
    weight with one active channel per output reproduces the codes times their scales."""
    k = 256 if bits == 8 else 32
    n = 256 if bits == 8 else 32
    g = torch.Generator().manual_seed(0)
    qw = quantize_weight(torch.randn(n, k, generator=g), bits, 32 if bits == 4 else None)
    x = torch.randn(3, k, generator=g)
    one = dict(ONE_GROUP=True) if bits == 4 else {}
    for xx, extra in ((x, dict(FAST_CVT=False)), (x, dict(FAST_CVT=True)), (x[:1], dict(FRAC=True, **one))):
        cfg = dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, num_warps=4, **extra)
        out = qg.launch_quant_sparse_linear(xx, qw.qweight, qw.scales, qw.offsets, None, 0.3, bits, qw.group_size,
                                            config=cfg)
        ref = quant_sparse_linear_reference(xx, qw.qweight, qw.scales, qw.offsets, None, 0.3, False, bits,
                                            qw.group_size)
        # FRAC (one row) sums x * (1 + u / 256) and removes sum(x) at the end: 8 of fp32's 24 bits
        # go to the constant (the autotuner keeps it for half-precision x, whose own error is larger)
        tol = 1e-4 if extra.get("FRAC") else 1e-5
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    codes = qw.qweight.flatten().to(torch.int32)
    if bits == 8:
        assert codes.unique().numel() >= 200  # the weights exercise nearly every int8 code
    else:
        assert (codes & 0xF).unique().numel() == 16 and (codes >> 4).unique().numel() == 16


@pytest.mark.parametrize("bits", [8, 4])
def test_every_code_converts_exactly(bits):
    """One active channel (x = 1) whose weight row holds every code once: each conversion
    (instruction, FAST_CVT bit trick, FRAC mantissa trick, on predicated and compacted loops)
    must give back exactly the codes (unit scales, zero offsets)."""
    k, row = 32, 5
    if bits == 8:
        n = 256
        q = torch.zeros(k, n, dtype=torch.int8)
        q[row] = torch.arange(-128, 128, dtype=torch.int32).to(torch.int8)
        scales, offsets, group = torch.ones(n), None, 0
        expect = torch.arange(-128, 128, dtype=torch.float32)
    else:
        n = 32
        j = torch.arange(16, dtype=torch.int32)
        q = torch.zeros(k, n // 2, dtype=torch.uint8)
        q[row] = (j | ((15 - j) << 4)).to(torch.uint8)  # low nibbles 0..15, high ones 15..0
        scales, offsets, group = torch.ones(1, n), torch.zeros(1, n), 32
        expect = torch.cat([j, 15 - j]).float()
    x = torch.zeros(1, k)
    x[0, row] = 1.0
    one = dict(ONE_GROUP=True) if group else {}
    for extra in (dict(FAST_CVT=False), dict(FAST_CVT=True), dict(FRAC=True, **one),
                  dict(FRAC=True, COMPACT=True, **one), dict(COMPACT=True, **one)):
        out = qg.launch_quant_sparse_linear(x, q, scales, offsets, None, 0.5, bits, group,
                                            config=dict(BLOCK_N=16, BLOCK_K=16, CHUNK=32, num_warps=4, **extra))
        assert torch.equal(out[0], expect), extra


@pytest.mark.parametrize("bits", [8, 4])
def test_reserved_workspace_serves_every_row_count(bits):
    """A workspace reserved at compile time is never replaced by a launch (CUDA-graph pools)."""
    from actsparse.kernels.triton import _runtime as rt

    k, n = 64, 24
    qg.reserve_buffers(torch.device("cpu"), n)
    key = ("quant_gemv", torch.float32, "cpu", None)
    buf = rt._BUFFERS[key]
    assert buf.numel() >= rt.MAX_ROWS * n
    qw = quantize_weight(torch.randn(n, k) / 4, bits, 32 if bits == 4 else None)
    for m in (1, rt.MAX_ROWS):
        x = torch.randn(m, k)
        out = qg.launch_quant_sparse_linear(x, qw.qweight, qw.scales, qw.offsets, None, 0.3, bits, qw.group_size)
        ref = quant_sparse_linear_reference(x, qw.qweight, qw.scales, qw.offsets, None, 0.3, False, bits,
                                            qw.group_size)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert rt._BUFFERS[key] is buf and not bool(buf.any())  # reused, and left zeroed


def test_a_set_that_fails_to_compile_falls_back_to_the_predicated_configs(monkeypatch):
    """A Triton that cannot build a config of the default set (the interpreter compiles nothing,
    so this is where such a failure would first show) costs a warning, not the call."""
    import ast

    from triton.compiler.errors import CompilationError

    ran = []

    class Tuner:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **meta):
                if self.name != "predicated":
                    raise CompilationError("", ast.parse("x").body[0], "unsupported")
                ran.append(self.name)
            return launch

    monkeypatch.setattr(qg, "_tuned", lambda m_pad: Tuner(qg._CONFIG_SET))
    monkeypatch.setattr(qg, "FAILED_SETS", set())
    with pytest.warns(RuntimeWarning, match="uses the 'predicated' configs instead"):
        for _ in range(2):  # the second call goes straight to the fallback
            qg._run_tuned(1, None, [], {})
    assert ran == ["predicated", "predicated"] and qg.FAILED_SETS == {"all"}
    with pytest.raises(CompilationError):  # the predicated set itself failing is not hidden
        monkeypatch.setattr(qg, "_tuned", lambda m_pad: Tuner("compact"))
        qg._run_tuned(1, None, [], {})
