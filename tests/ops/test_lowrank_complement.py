"""``actsparse::lowrank_complement`` against its pure-torch reference; full rank is the dense linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.ops import constants
from actsparse.ops.lowrank_complement import lowrank_complement
from actsparse.ops.reference import lowrank_complement_reference, rsparse_linear_reference


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 8),
       t=st.floats(0.0, 2.0), seed=st.integers(0, 2**16))
def test_op_matches_reference(rows, k, n, r, t, seed):
    g = torch.Generator().manual_seed(seed)
    x, a, b = torch.randn(rows, 2, k, generator=g), torch.randn(n, r, generator=g), torch.randn(r, k, generator=g)
    scope = constants.ConstantScope()
    key = scope.add("t", a, b)
    try:
        got = lowrank_complement(x, key, n, t)
    finally:
        constants.release(tuple(scope.keys))
    ref = lowrank_complement_reference(x, a, b, t)
    assert got.shape == (rows, 2, n)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    manual = ((x * (x.abs() <= t)) @ b.T) @ a.T
    torch.testing.assert_close(ref, manual, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 10.0])
def test_full_rank_reproduces_the_dense_linear(t):
    g = torch.Generator().manual_seed(1)
    w, bias, x = torch.randn(7, 5, generator=g), torch.randn(7, generator=g), torch.randn(3, 5, generator=g)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    a, b = (u * s).float(), vh.float()
    torch.testing.assert_close(rsparse_linear_reference(x, w, bias, t, a, b), F.linear(x, w, bias),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rsparse_linear_reference(x, w, bias, t, None, None),
                               F.linear(x * (x.abs() > t), w, bias), rtol=1e-5, atol=1e-5)
