"""The rsparse GPU benchmark's bookkeeping (the timing itself needs a GPU)."""

from __future__ import annotations

import pytest

from benchmarks.rsparse_gpu import mask_sparsity


def test_mask_sparsity_keeps_the_effective_bytes():
    k, n, r = 4096, 1024, 64
    sm = mask_sparsity(0.5, r, k, n)
    read = (1 - sm) * k * n + r * (k + n)
    assert 1 - read / (k * n) == pytest.approx(0.5) and mask_sparsity(0.4, 0, k, n) == 0.4
