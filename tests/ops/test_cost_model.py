"""Cost model sanity: fewer bytes with more sparsity, denser unions with bigger batches, and a
breakeven batch that behaves."""

from __future__ import annotations

import math

import pytest
import sympy as sp

from actsparse.ops import cost_model as cm

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16])
def test_sparse_bytes_decrease_with_sparsity(k, n, m):
    b = [cm.bytes_moved(m, k, n, s / 10, 2) for s in range(11)]
    assert all(x >= y for x, y in zip(b, b[1:]))
    assert b[0] == pytest.approx(cm.bytes_moved(m, k, n, 0.0, 2, sparse=False))
    assert b[-1] == pytest.approx(2 * m * (k + n))  # only activations left to move


def test_union_density_grows_with_batch():
    for s in (0.3, 0.5, 0.9):
        u = [cm.union(m, s) for m in range(1, 33)]
        assert all(x < y for x, y in zip(u, u[1:]))
        assert u[0] == pytest.approx(1 - s)
    assert cm.union(16, 0.0) == 1.0 and cm.union(16, 1.0) == 0.0


def test_union_density_symbolic():
    assert sp.simplify(cm.union_density.subs(cm.M, 1) - (1 - cm.s)) == 0
    assert sp.diff(cm.union_density, cm.M).subs({cm.M: 3, cm.s: sp.Rational(1, 2)}) > 0


@pytest.mark.parametrize("k,n", SHAPES)
def test_speedup_bounded_by_ideal_and_monotone(k, n):
    sp_ = [cm.predict(1, k, n, s / 10)["speedup"] for s in range(10)]
    assert all(x <= y + 1e-12 for x, y in zip(sp_, sp_[1:]))
    dev = cm.H100
    cap = dev.sparse_efficiency / dev.dense_efficiency  # kernel bandwidth advantage
    for s10, v in enumerate(sp_):
        assert v <= cap / (1 - s10 / 10) + 1e-9


EVEN = cm.Device(dense_efficiency=0.8, sparse_efficiency=0.8, batch_sparse_efficiency=0.8,
                 batch_sparse_overhead=cm.H100.sparse_overhead)  # kernels equally good at full density


def test_prefer_sparse_sanity():
    # big layer, batch 1, half sparse: sparse; no sparsity: dense; huge batch: dense
    assert cm.prefer_sparse(1, 14336, 4096, 0.5, 2)
    assert not cm.prefer_sparse(1, 14336, 4096, 0.0, 2, device=EVEN)
    assert not cm.prefer_sparse(64, 14336, 4096, 0.5, 2, device=EVEN)
    # a tiny layer is launch-bound: skipping bytes cannot pay for the extra fixed cost
    assert not cm.prefer_sparse(1, 64, 64, 0.9, 2)


@pytest.mark.parametrize("k,n", SHAPES)
def test_breakeven_batch(k, n):
    b5, b9 = cm.breakeven_batch(k, n, 0.5, device=EVEN), cm.breakeven_batch(k, n, 0.9, device=EVEN)
    assert 1 <= b5 <= b9 < math.inf  # sparser activations keep paying to larger batches
    assert cm.prefer_sparse(b5 - 1, k, n, 0.5, device=EVEN) if b5 > 1 else True
    assert not cm.prefer_sparse(b5, k, n, 0.5, device=EVEN)
    assert cm.breakeven_batch(k, n, 0.0) == 1
    # with the default (measured) device too: monotone in sparsity
    assert cm.breakeven_batch(k, n, 0.5) <= cm.breakeven_batch(k, n, 0.9)


def test_breakeven_closed_form_matches_scan():
    expr = cm.breakeven_batch_expr()
    dev = EVEN
    vals = {cm.K: 14336, cm.N: 4096, cm.b: 2, cm.s: 0.9, **dev.subs()}
    m_star = float(expr.subs(vals))
    # the scan includes the (tiny) input/output bytes at M > 1: within one batch step
    assert abs(math.ceil(m_star) - cm.breakeven_batch(14336, 4096, 0.9, device=EVEN)) <= 1


def test_gated_mlp_prediction():
    lo = cm.gated_mlp_predict(1, 4096, 14336, 0.5)["speedup"]
    hi = cm.gated_mlp_predict(1, 4096, 14336, 0.9)["speedup"]
    assert 1.0 < lo < hi < 3.0 * cm.H100.sparse_efficiency / cm.H100.dense_efficiency
