"""The tensor-parallel benchmark (benchmarks/e2e_tp.py, on demos/tp_demo.py): its pure parts, and
one run of the whole script on the CPU with two gloo ranks (slow: the GPU run cannot be tried here)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import e2e_tp
from demos import tp_demo

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_defaults_and_cpu_overrides():
    a = e2e_tp.parse_args(["--device", "cuda"])
    assert (a.model, a.batch, a.sparsity, a.dtype, a.cudagraphs, a.check) == \
        ("llama3-8b", [1, 16], 0.5, "bfloat16", True, True)
    a = e2e_tp.parse_args(["--model", "tiny", "--device", "cpu", "--batch", "1", "--no-check"])
    assert (a.dtype, a.cudagraphs, a.check, a.batch) == ("float32", False, False, [1])
    for bad in (["--device", "cpu", "--cudagraphs"], ["--sparsity", "0"], ["--sparsity", "1.5"],
                ["--batch", "0"]):
        with pytest.raises(SystemExit):
            e2e_tp.parse_args(bad)
    d = tp_demo.parse_args(["--device", "cpu"])
    assert (d.model, d.sparsity, d.dtype, d.cudagraphs) == ("tiny", 0.5, "float32", False)


def test_verdict():
    assert e2e_tp.verdict(1e-6, 0.4, "float32")
    assert not e2e_tp.verdict(1e-3, 0.4, "float32")
    assert not e2e_tp.verdict(1e-6, 1e-5, "float32")  # the masks must matter
    assert e2e_tp.verdict(0.02, 0.3, "bfloat16") and not e2e_tp.verdict(0.1, 0.3, "bfloat16")
    assert not e2e_tp.verdict(math.nan, 0.3, "bfloat16")


def test_rel_err():
    a = [torch.ones(2, 3), torch.full((2, 3), 2.0)]
    assert e2e_tp.rel_err(a, a) == 0.0
    assert e2e_tp.rel_err([a[0] * 1.1, a[1]], a) == pytest.approx(0.1, rel=1e-5)


def test_merge_rows_keeps_other_rank_counts(tmp_path):
    out = tmp_path / "r.json"
    row = lambda v, g, b, t: {"variant": v, "gpus": g, "batch": b, "sparsity": 0.5 * (v != "dense"), "tok_s": t}  # noqa: E731
    tp_demo.merge_rows(out, {"cpu": "x", "command": "a"}, [row("dense", 1, 1, 10.0), row("sparse-50%", 1, 1, 12.0)])
    data = tp_demo.merge_rows(out, {"cpu": "x", "command": "b"}, [row("dense", 2, 1, 15.0)])
    assert data["command"] == "b" and len(data["rows"]) == 3
    data = tp_demo.merge_rows(out, {"cpu": "x"}, [row("dense", 2, 1, 16.0)])  # a rerun replaces its row
    assert [r["tok_s"] for r in data["rows"] if r["gpus"] == 2] == [16.0]
    assert json.loads(out.read_text()) == data
    assert [(r["gpus"], r["variant"]) for r in data["rows"]] == [(1, "dense"), (1, "sparse-50%"), (2, "dense")]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_the_benchmark_runs_on_the_cpu_with_two_ranks(tmp_path):
    out = tmp_path / "tp.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "benchmarks.e2e_tp",
           "--model", "tiny", "--device", "cpu", "--batch", "1", "--new-tokens", "4", "--repeats", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["check_2_ranks"]["ok"], data["check_2_ranks"]
    assert {(r["variant"], r["gpus"]) for r in data["rows"]} == {("dense", 2), ("sparse-50%", 2)}
    assert all(r["tok_s"] > 0 for r in data["rows"])
