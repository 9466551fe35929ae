"""The Triton block-sparse expert MLP against the ops' reference, in Triton's CPU interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from actsparse.kernels.triton import expert_mlp as em  # noqa: E402
from actsparse.ops.reference import expert_mlp_reference  # noqa: E402
from tests.kernels.test_sparse_gemv import EPS, weight  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="these tests run the Triton interpreter on CPU tensors")


def case(M, dtype, act, seed, experts=4, bs=24, d=40, n_out=None, density=0.5, down_input_major=True):
    g = torch.Generator().manual_seed(seed)
    f = experts * bs
    n_out = n_out or d
    x = torch.randn(M, d, generator=g).to(dtype)
    wg = weight(f, d, dtype, False, g)
    wu = weight(f, d, dtype, False, g)
    wd = weight(n_out, f, dtype, down_input_major, g)
    mask = torch.rand(M, experts, generator=g) < density
    out = em.launch_expert_mlp(x, mask, wg, wu, wd, act)
    ref = expert_mlp_reference(x, mask, wg, wu, wd, None, None, None, act)
    assert out.dtype == dtype and out.shape == (M, n_out)
    err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
    assert err < 4 * EPS[dtype] or float(ref.float().abs().max()) == 0.0, err
    return out, ref


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_shapes(M, dtype):
    # 7 experts of 13 neurons: blocks straddle the kernels' tiles; 37 outputs: a ragged last tile
    case(M, dtype, "silu", seed=M, experts=7, bs=13, d=29, n_out=37, density=0.4,
         down_input_major=M != 3)


@pytest.mark.parametrize("act", em.ACTIVATIONS)
def test_activations(act):
    case(2, torch.float32, act, seed=5)


def test_no_expert_selected_is_zero():
    out, ref = case(3, torch.float32, "silu", seed=6, density=0.0)
    assert float(out.abs().max()) == 0.0 and float(ref.abs().max()) == 0.0


def test_rows_keep_their_own_experts():
    """Row 0 selects expert 0 only, row 1 expert 1 only: the union is read, each row keeps its own."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, generator=g)
    wg, wu = (torch.randn(32, 16, generator=g) for _ in range(2))
    wd = torch.randn(16, 32, generator=g)
    mask = torch.tensor([[True, False], [False, True]])
    out = em.launch_expert_mlp(x, mask, wg, wu, wd, "relu")
    for r in range(2):
        alone = em.launch_expert_mlp(x[r:r + 1], mask[r:r + 1], wg, wu, wd, "relu")
        torch.testing.assert_close(out[r:r + 1], alone, rtol=1e-5, atol=1e-5)
