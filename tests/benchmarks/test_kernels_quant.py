"""The quantized kernel benchmark's tiny CPU path (Triton interpreter) runs and checks every case."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from benchmarks import kernels_quant  # noqa: E402


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel in Triton's interpreter")
def test_tiny_path(tmp_path):
    out = tmp_path / "k.json"
    kernels_quant.main(["--tiny", "--sparsity", "0", "0.5", "--batches", "1", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 and all(r["rel_err"] < 1e-5 for r in rows)
