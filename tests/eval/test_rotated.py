"""Rotated top-k (LaRoSA study): the rotations, the hooks, and dense equivalence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.calibration import CalibrationError
from actsparse.calibration.larosa import eigen_rotation, fit_rotations, rotation_groups
from actsparse.calibration.sites import groups, trace_sites
from actsparse.eval.rotated import keep_count, rotated_input, rotated_topk, topk_mask
from actsparse.models import tiny


def _model_and_batches():
    model = tiny("llama", num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, model.config.vocab_size, (2, 16), generator=g) for _ in range(2)]
    return model, batches


@given(st.integers(1, 5), st.integers(2, 24), st.floats(0.0, 0.95), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_rotated_input_is_the_rotated_product(rows, d, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, d, generator=g), torch.randn(7, d, generator=g)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    q = eigen_rotation(a @ a.T)
    k = keep_count(d, sparsity)
    xq = x @ q
    keep = xq.abs().topk(k, dim=-1).indices
    xq_m = torch.zeros_like(xq).scatter(-1, keep, xq.gather(-1, keep))
    want = xq_m @ (w @ q).T  # (x Q)_masked (W Q)^T
    got = F.linear(rotated_input(x, q, k), w)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ((topk_mask(xq, k) != 0).sum(-1) <= k).all()


def test_eigen_rotation_is_orthogonal_and_sorted():
    a = torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = a @ a.T
    q = eigen_rotation(m).double()
    torch.testing.assert_close(q.T @ q, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    energy = torch.diagonal(q.T @ m @ q)
    assert (energy[:-1] >= energy[1:] - 1e-6).all()  # largest eigenvalue first


def test_keep_count_validates():
    assert keep_count(10, 0.0) == 10 and keep_count(10, 0.5) == 5 and keep_count(10, 0.99) == 1
    with pytest.raises(ValueError, match="sparsity"):
        keep_count(10, 1.0)


def test_rotation_premise_on_correlated_inputs():
    """On strongly correlated inputs, top-k in the eigenbasis keeps more of the energy."""
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32)[:, None]
    x = torch.randn(4096, 32, generator=g) @ mix
    q = eigen_rotation(x.double().T @ x.double())
    k = keep_count(32, 0.5)
    plain = (topk_mask(x, k) - x).square().sum()
    rot = (rotated_input(x, q, k) - x).square().sum()
    assert rot < 0.5 * plain


def test_dense_equivalence_and_groups():
    model, batches = _model_and_batches()
    sites = trace_sites(model)
    rot = fit_rotations(model, sites, batches, "all")
    assert set(rot) == set(groups(sites))
    assert set(rotation_groups(sites, "residual")) < set(rot)
    with pytest.raises(CalibrationError, match="scope"):
        rotation_groups(sites, "some")
    x = batches[0]
    with torch.no_grad():
        dense = model(input_ids=x).logits
        with rotated_topk(model, sites, rot, 0.0):  # nothing masked: the rotation alone changes nothing
            same = model(input_ids=x).logits
        with rotated_topk(model, sites, rot, 0.5):
            sparse = model(input_ids=x).logits
        after = model(input_ids=x).logits
    torch.testing.assert_close(same, dense, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sparse, dense, atol=1e-3)
    torch.testing.assert_close(after, dense)  # hooks removed


def test_group_members_see_one_masked_copy():
    model, batches = _model_and_batches()
    sites = trace_sites(model)
    rot = fit_rotations(model, sites, batches, "residual")
    seen: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    members = next(ms for ms in groups(sites).values() if len(ms) > 1)
    hs = [mods[s.module].register_forward_pre_hook(lambda m, a, n=s.module: seen.__setitem__(n, a[0]))
          for s in members]
    with torch.no_grad(), rotated_topk(model, sites, rot, 0.5):
        model(input_ids=batches[0])
    for h in hs:
        h.remove()
    first = seen[members[0].module]
    for s in members[1:]:
        assert torch.equal(seen[s.module], first)
