"""The quantized end-to-end benchmark (benchmarks/e2e_quant.py): its tiny CPU path runs and writes
the rows the GPU run will write, with a passing correctness check; option errors."""

from __future__ import annotations

import json

import pytest

from benchmarks import e2e_quant


def _has_torchao() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.parametrize("torchao", ["auto", "off"])
def test_tiny_cpu_path(tmp_path, torchao):
    if torchao == "auto" and not _has_torchao():
        pytest.skip("torchao is not installed")
    out = tmp_path / "q.json"
    e2e_quant.main(["--tiny", "--device", "cpu", "--compiler", "eager", "--sparsity", "0.5", "0.0",
                    "--batches", "1", "--new-tokens", "3", "--repeats", "1", "--torchao", torchao, "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["cpu"] == "cpu" and res["command"].startswith("python -m benchmarks.e2e_quant")
    assert all(v["ok"] for v in res["correctness"].values()), res["correctness"]
    got = {(r["variant"], r["bits"], r["sparsity"]) for r in res["rows"]}
    want = {("dense-bf16", 16, 0.0), ("dense-int8", 8, 0.0), ("dense-int4", 4, 0.0),
            ("sparse-int8", 8, 0.5), ("sparse-int4", 4, 0.5), ("sparse-int8", 8, 0.0),
            ("sparse-int4", 4, 0.0)}
    if torchao == "auto":  # torchao's int8 and unpacked int4 on the CPU (its int4 tinygemm path is CUDA only)
        want |= {("dense-torchao-int8", 8, 0.0), ("sparse-torchao-int8", 8, 0.5), ("sparse-torchao-int8", 8, 0.0),
                 ("dense-torchao-intx4", 4, 0.0), ("sparse-torchao-intx4", 4, 0.5), ("sparse-torchao-intx4", 4, 0.0)}
        assert {"torchao-int8", "torchao-intx4"} <= set(res["correctness"]) and res["torchao"].startswith("0.")
    else:
        assert res["torchao"] == "off"
    assert got == want
    for r in res["rows"]:
        assert set(r) >= {"variant", "bits", "batch", "sparsity", "tok_s", "vs_dense", "cudagraph_skips"}
        assert r["tok_s"] > 0 and r["cudagraph_skips"] == 0  # eager on the CPU: nothing to skip
    assert "errors" not in res


def test_defaults_and_errors():
    a = e2e_quant.parse_args(["--out", "x.json"])
    assert (a.model, a.batches, a.bits, a.device) == ("llama3-8b", [1, 4], [8, 4], "cuda")
    assert sorted(a.sparsity) == [0.0, 0.25, 0.4, 0.5, 0.6]
    for bad in (["--sparsity", "1.0"], ["--bits", "2"]):
        with pytest.raises(SystemExit):
            e2e_quant.parse_args(bad + ["--out", "x.json"])


def test_row_order_puts_the_targets_comparison_first():
    a = e2e_quant.parse_args(["--out", "x.json", "--batches", "1", "--sparsity", "0.5", "0.4"])
    rows = e2e_quant.row_order(a, ("torchao-int8", "torchao-int4", "torchao-intx4"))
    assert rows[:7] == [(1, "dense", None, None), (1, "dense", "torchao-int8", None), (1, "sparse", "torchao-int8", 0.5),
                        (1, "sparse", 8, 0.5), (1, "dense", "torchao-int4", None),
                        (1, "sparse", "torchao-intx4", 0.5), (1, "sparse", 4, 0.5)]
    assert len(rows) == len(set(rows))
    assert {(1, "dense", 8, None), (1, "dense", 4, None), (1, "sparse", 8, 0.4), (1, "dense", "torchao-intx4", None),
            (1, "sparse", "torchao-intx4", 0.4)} <= set(rows)
    assert (1, "sparse", "torchao-int4", 0.5) not in rows  # tinygemm's packed layout: dense only
    no_ao = e2e_quant.row_order(a)
    assert no_ao[:3] == [(1, "dense", None, None), (1, "dense", 8, None), (1, "sparse", 8, 0.5)]
