"""The Triton gated-MLP kernels (CATS threshold or a given mask) against the ops' reference,
in Triton's CPU interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from actsparse.kernels.triton import gated_mlp as gm  # noqa: E402
from actsparse.ops.reference import activation, gated_mlp_reference, predicted_mlp_reference  # noqa: E402
from tests.kernels.test_sparse_gemv import DTYPES, EPS, assert_close, weight  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the Triton interpreter on CPU tensors")


def cats_case(M, dtype, act, seed, sparsity=0.5, up_row_major=True, down_input_major=True, d=72, f=88):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d, generator=g).to(dtype)
    wg = weight(f, d, dtype, False, g)
    wu = weight(f, d, dtype, not up_row_major, g)
    wd = weight(d, f, dtype, down_input_major, g)
    gate = activation(act, x.float() @ wg.float().t()).abs().flatten().sort().values
    # halfway between two gate values: no value sits on the threshold, so a gate rounded to
    # the model dtype (the dense fallback computes it there) cannot flip sides easily
    i = min(int(sparsity * gate.numel()), gate.numel() - 2)
    thr = -1.0 if sparsity <= 0 else (1e30 if sparsity >= 1 else float(gate[i] + gate[i + 1]) / 2)
    out = gm.launch_gated_mlp(x, wg, wu, wd, act, threshold=thr)
    ref = gated_mlp_reference(x, wg, wu, wd, None, None, None, act, thr)
    assert out.dtype == dtype and out.shape == (M, d)
    # the down projection may round h to the weight dtype (tensor-core path): compare by norm
    err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
    assert err < 4 * EPS[dtype], err
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_cats_grid(dtype, M):
    i = DTYPES.index(dtype) * 3 + [1, 3, 16].index(M)
    cats_case(M, dtype, gm.ACTIVATIONS[i % 4], seed=i, sparsity=[0.0, 0.5, 0.9][i % 3],
              up_row_major=i % 2 == 0, down_input_major=i % 4 != 1)


@pytest.mark.parametrize("act", gm.ACTIVATIONS)
def test_cats_activations(act):
    cats_case(2, torch.float32, act, seed=11, sparsity=0.6)


def test_cats_all_masked_is_zero():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 72, generator=g)
    w = [weight(88, 72, torch.float32, False, g) for _ in range(2)] + [weight(72, 88, torch.float32, True, g)]
    out = gm.launch_gated_mlp(x, *w, "silu", threshold=1e30)
    assert torch.count_nonzero(out) == 0


def test_cats_gate_up_h_matches():
    """The fused gate/up kernel writes h = mask * act(g) * u in fp32."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(5, 40, generator=g)
    wg, wu = weight(24, 40, torch.float32, False, g), weight(24, 40, torch.float32, False, g)
    h = gm.launch_gate_up(x, wg, wu, "gelu_tanh", threshold=0.2, config=dict(BLOCK_F=16, BLOCK_K=16, num_warps=4))
    gate = activation("gelu_tanh", x @ wg.t())
    ref = torch.where(gate.abs() > 0.2, gate * (x @ wu.t()), 0.0)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- a given mask (learned predictors)


def mask_case(m, k, n, out, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    mask = torch.rand(m, n, generator=g) < density
    w = [torch.randn(n, k, generator=g) / 4, torch.randn(n, k, generator=g) / 4,
         (torch.randn(out, n, generator=g) / 4).t().contiguous().t()]
    return x, mask, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_given_mask_matches_reference(dtype, m, density):
    x, mask, w = mask_case(m, k=72, n=70, out=40, density=density)  # tails in every dimension
    x, w = x.to(dtype), [t.to(dtype) for t in w]
    got = gm.launch_gated_mlp(x, *w, "silu", mask=mask, sparsity_hint=0.5)
    want = predicted_mlp_reference(x, mask, *w, None, None, None, "silu")
    eps = EPS[dtype]
    scale = float(want.float().abs().max()) + 1e-6
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * eps, atol=2 * eps * scale)


def test_given_mask_gate_up_skips_masked_neurons():
    """h is exactly zero where the mask is off, and equals act(g) * u where it is on."""
    x, mask, w = mask_case(2, k=40, n=50, out=8, density=0.5)
    h = gm.launch_gate_up(x, w[0], w[1], "gelu_tanh", mask=mask)
    assert torch.all(h[~mask] == 0)
    want = activation("gelu_tanh", x @ w[0].t()) * (x @ w[1].t())
    torch.testing.assert_close(h[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_threshold_and_mask_are_exclusive():
    x, mask, w = mask_case(1, k=16, n=16, out=8, density=0.5)
    with pytest.raises(AssertionError):
        gm.launch_gate_up(x, w[0], w[1], "silu", threshold=0.1, mask=mask)


@pytest.mark.parametrize("which", ["gate", "all"])
@pytest.mark.parametrize("m", [1, 3])
def test_biases_match_reference(which, m):
    """Shifted ReLU folds its shift into a gate bias: the kernels take biases on gate, up and
    down instead of leaving such MLPs to the masked dense form."""
    g = torch.Generator().manual_seed(20 + m)
    d, f = 72, 88
    x = torch.randn(m, d, generator=g)
    wg, wu = weight(f, d, torch.float32, False, g), weight(f, d, torch.float32, False, g)
    wd = weight(d, f, torch.float32, True, g)
    bg = -0.5 - torch.rand(f, generator=g)  # a shift: most neurons below zero, as shifted ReLU makes them
    bu = torch.randn(f, generator=g) if which == "all" else None
    bd = torch.randn(d, generator=g) if which == "all" else None
    out = gm.launch_gated_mlp(x, wg, wu, wd, "relu", threshold=0.0, b_gate=bg, b_up=bu, b_down=bd)
    ref = gated_mlp_reference(x, wg, wu, wd, bg, bu, bd, "relu", 0.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    h = gm.launch_gate_up(x, wg, wu, "relu", threshold=0.0, b_gate=bg, b_up=bu)
    assert 0.3 < float((h == 0).float().mean()) < 1.0  # the shift made most of h exactly zero


def test_biases_with_a_given_mask():
    x, mask, w = mask_case(3, k=40, n=50, out=24, density=0.4)
    g = torch.Generator().manual_seed(31)
    bg, bu, bd = torch.randn(50, generator=g), torch.randn(50, generator=g), torch.randn(24, generator=g)
    got = gm.launch_gated_mlp(x, *w, "silu", mask=mask, b_gate=bg, b_up=bu, b_down=bd)
    want = predicted_mlp_reference(x, mask, *w, bg, bu, bd, "silu")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bias_of_the_wrong_width_is_refused():
    x, mask, w = mask_case(1, k=16, n=16, out=8, density=0.5)
    with pytest.raises(AssertionError, match="b_gate"):
        gm.launch_gate_up(x, w[0], w[1], "relu", threshold=0.0, b_gate=torch.zeros(15))
