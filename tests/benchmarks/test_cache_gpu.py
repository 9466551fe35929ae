"""The GPU cache benchmark's logic and correctness checks, run on CPU (``--dry-run``).

The Triton kernel runs in Triton's CPU interpreter, which must be on before Triton is imported;
timings on CPU mean nothing, so only the structure, the masks and the errors are checked.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import cache_gpu  # noqa: E402


def _interpreter_reason() -> str | None:
    """Why the Triton interpreter cannot run the kernel here, or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1: the kernel cannot run on CPU tensors"
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from actsparse.kernels.triton import sparse_gemv
    except Exception as e:  # no Triton on this machine
        return f"Triton unavailable: {e!r}"
    if not isinstance(sparse_gemv._sparse_linear_kernel, InterpretedFunction):
        return "the kernel module was imported before TRITON_INTERPRET was set"
    return None


def test_inputs_reproduce_masks_sparsity_and_overlap():
    K, steps, s, o = 200, 6, 0.5, 0.6
    masks, xs = cache_gpu.build_inputs(K, 4, steps, s, o, seed=3, dtype=torch.bfloat16)
    assert masks.shape == xs.shape == (steps, 4, K)
    assert torch.equal(xs.float().abs() > cache_gpu.THRESHOLD, masks)
    assert (masks.sum(-1) == 100).all()  # a fixed number of active channels per row and step
    for r in range(4):
        assert cache_gpu.overlap_of(masks[:, r]) == pytest.approx(o, abs=1e-6)
    st = cache_gpu.union_stats(masks, warmup=1)
    assert 0.5 < st["union_density"] <= 1.0 and st["row_overlap"] == pytest.approx(o)
    assert cache_gpu.count_host_syncs(lambda: None, torch.device("cpu")) is None


def test_dry_run_rows_errors_and_recommendations(tmp_path):
    reason = _interpreter_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "cache_gpu.json"
    cache_gpu.main(["--dry-run", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert out.with_suffix(".md").exists() and not rep["partial"] and not rep["skipped"]
    rows = rep["rows"]
    shapes, batches = set(cache_gpu.DRY_SHAPES), set(cache_gpu.BATCHES)
    assert {(r["shape"], r["M"]) for r in rows} == {(s, m) for s in shapes for m in batches}
    for r in rows:
        assert r["ok"], r["max_rel_err"]
        assert set(r["max_rel_err"]) == {"triton", "cache", "gather"}  # no CUDA graph on CPU
        assert all(0 <= e < cache_gpu.ERR_OK for e in r["max_rel_err"].values())
        assert set(r["ms"]) >= {"dense", "triton", "cache", "gather"} and r["fastest"] in cache_gpu.CANDIDATES
        if r["M"] == 1:
            assert r["union_density"] == pytest.approx(1 - r["sparsity"], abs=0.02)
    m16 = [r for r in rows if r["M"] == 16]
    assert all(r["union_density"] > 0.9 for r in m16)  # independent rows: the union is nearly dense
    rec = rep["recommendation"]
    assert {(p["shape"], p["M"]) for p in rec["per_shape"]} == {(s, m) for s in shapes for m in batches}
    assert all(p["fastest"] in cache_gpu.CANDIDATES for p in rec["per_shape"])
    assert set(rec["by_batch"]) == {str(m) for m in batches}
