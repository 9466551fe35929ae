"""``expert_mlp`` and ``route_experts``: every dispatch branch, forced, equals the reference."""

from __future__ import annotations

import itertools

import pytest
import torch

import actsparse.ops.expert_mlp as expert_mod
from actsparse.ops import constants, dispatch
from actsparse.ops.reference import expert_mask, expert_mlp_reference, neuron_mask
from tests.ops.test_dispatch import DTYPES, HAS_TRITON, ROWS, Spy, _close, _gen, _params, _weight


@pytest.fixture
def spy(monkeypatch):
    s = Spy(monkeypatch)
    s.on(expert_mod, "masked_predicted_mlp", "dense")
    s.on(expert_mod, "masked_mlp_gathered", "gather", taken=lambda r: r is not None)
    if HAS_TRITON:
        s.on(dispatch.triton_module("expert_mlp"), "launch_expert_mlp", "triton")
    return s


@pytest.mark.parametrize("path", _params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expert_mlp_every_branch(spy, path, dtype):
    gen = _gen(path, str(dtype), "experts")
    for i, (rows, bias) in enumerate(itertools.product(ROWS, (False, True))):
        k, experts, bs = (13, 27)[i % 2], (5, 3)[i % 2], (7, 6)[i % 2]
        f = experts * bs
        x = torch.randn(1, rows, k, generator=gen).to(dtype)
        mask = torch.rand(1, rows, experts, generator=gen) < (0.2, 0.6)[i % 2]
        wg, wu = (_weight(f, k, dtype, False, gen) for _ in range(2))
        wd = _weight(k, f, dtype, i % 2 == 0, gen)
        bs_ = [torch.randn(n, generator=gen).to(dtype) if bias else None for n in (f, f, k)]
        spy.reset()
        with dispatch.forced(path):
            got = torch.ops.actsparse.expert_mlp(x, mask, wg, wu, wd, *bs_, "silu", 0.5)
        _close(got, expert_mlp_reference(x, mask, wg, wu, wd, *bs_, "silu"), dtype)
        if path == "triton":
            assert spy["triton"] == int(not bias) and spy["dense"] == int(bias), spy.calls
        elif path == "cpu":
            assert spy["triton"] == 0 and spy["dense"] + spy["gather"] == 1, spy.calls
        else:
            assert spy["dense"] == 1 and spy["gather"] == 0 and spy["triton"] == 0, spy.calls


def test_expert_mlp_gathers_few_experts(spy):
    """One row, one expert of four: the CPU path reads that expert's block only."""
    gen = _gen("few")
    x = torch.randn(1, 1, 16, generator=gen)
    wg, wu = (torch.randn(32, 16, generator=gen) for _ in range(2))
    wd = torch.randn(16, 32, generator=gen)
    mask = torch.tensor([[[False, False, True, False]]])
    with dispatch.forced("cpu"):
        got = torch.ops.actsparse.expert_mlp(x, mask, wg, wu, wd, None, None, None, "relu", 0.75)
    assert spy["gather"] == 1
    _close(got, expert_mlp_reference(x, mask, wg, wu, wd, None, None, None, "relu"), torch.float32)


def test_neuron_mask_is_contiguous_blocks():
    m = torch.tensor([[True, False, True]])
    assert neuron_mask(m, 6).tolist() == [[True, True, False, False, True, True]]
    with pytest.raises(ValueError, match="equal experts"):
        neuron_mask(m, 7)


@pytest.mark.parametrize("two_layer", [False, True], ids=["linear", "mlp"])
def test_route_experts_matches_reference(two_layer):
    gen = _gen("route", two_layer)
    d, e, r = 11, 6, 4
    router = [torch.randn(r, d, generator=gen), torch.randn(r, generator=gen),
              torch.randn(e, r, generator=gen), torch.randn(e, generator=gen)] if two_layer else \
        [torch.randn(e, d, generator=gen), torch.randn(e, generator=gen)]
    scope = constants.ConstantScope()
    key = scope.add("test-router", *router)
    try:
        for rows in ROWS:
            x = torch.randn(2, rows, d, generator=gen)
            got = torch.ops.actsparse.route_experts(x, key, e, 0.3)
            assert got.dtype == torch.bool and got.shape == (2, rows, e)
            assert torch.equal(got, expert_mask(x, router, 0.3))
    finally:
        constants.release(tuple(scope.keys))
