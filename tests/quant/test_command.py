"""`actsparse quantize` and `actsparse eval --quantized`: options checked before any model is
loaded, the calibration tokens and plan handed to ``actsparse.quantize``, and the saved file
evaluated as the in-memory model would be."""

from __future__ import annotations

import json

import pytest
import torch

import actsparse
from actsparse.cli import main
from actsparse.models import ModelNotInstalledError, load
from actsparse.quant import QuantLinear, load_quantized
from actsparse.quant.files import read_header


@pytest.mark.parametrize("argv,message", [
    (["--bits", "8", "--rounding", "nearest", "--plan", "p.json"], "takes --rounding gptq"),
    (["--bits", "8", "--clip", "mse"], "--clip chooses int4 ranges"),
    (["--bits", "4", "--tokens", "100", "--seq-len", "512"], "must hold at least one --seq-len"),
    (["--bits", "4", "--plan", "absent.json"], "plan file not found"),
    (["--bits", "4", "--hessian-memory-gb", "0"], "--hessian-memory-gb must be positive"),
])
def test_quantize_command_rejects_bad_options(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("actsparse.models.load", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["quantize", *argv, "--out", "m.safetensors"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("actsparse quantize: error:")


def test_quantize_command_refuses_a_directory_and_unknown_model(tmp_path, capsys):
    assert main(["quantize", "--bits", "8", "--rounding", "nearest", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["quantize", "--model", "no-such-model", "--bits", "8", "--rounding", "nearest",
                 "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "cannot load model 'no-such-model'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load("smollm2-135m")
    except ModelNotInstalledError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_quantize_command_hands_tokens_and_plan_to_quantize(smollm2, tmp_path, monkeypatch):
    """What the command passes on (GPTQ itself replaced by nearest rounding, for time): the
    calibration text's first --tokens ids in --seq-len rows, the plan, the options; the file's
    header records them."""
    from actsparse.calibration.data import wikitext2_split

    model, tok = smollm2
    name = "model.layers.0.mlp.down_proj"
    plan_path = actsparse.SparsityPlan.from_thresholds(model, {name: 0.1}).save(tmp_path / "plan.json")
    seen = {}
    real = actsparse.quant.quantize

    def spy(model, bits, group_size=None, **opts):
        seen.update(opts, bits=bits, group_size=group_size)
        return real(model, bits=bits, group_size=group_size)

    monkeypatch.setattr(actsparse.quant, "quantize", spy)
    out = tmp_path / "m.safetensors"
    assert main(["quantize", "--bits", "4", "--group-size", "64", "--rounding", "gptq-act", "--plan", str(plan_path),
                 "--tokens", "600", "--seq-len", "256", "--hessian-memory-gb", "2", "--no-progress",
                 "--out", str(out)]) == 0
    text, _, _ = wikitext2_split(None)
    want = tok(text, return_tensors="pt").input_ids[:, :512].reshape(2, 256)
    assert torch.equal(seen["tokens"], want) and seen["rounding"] == "gptq-act" and seen["hessian_memory_gb"] == 2
    assert seen["plan"].thresholds[name] == pytest.approx(0.1) and (seen["bits"], seen["group_size"]) == (4, 64)
    info = read_header(out)["info"]
    assert info["rounding"] == "gptq-act" and info["calibration_tokens"] == 512 and info["group_size"] == 64
    assert info["plan"]["path"] == str(plan_path)


@pytest.mark.slow
def test_eval_reads_the_saved_weights(smollm2, tmp_path, capsys):
    """`eval --quantized` gives the perplexity of the model quantized in memory."""
    from actsparse.eval.results import run_eval

    out = tmp_path / "m8.safetensors"
    assert main(["quantize", "--bits", "8", "--rounding", "nearest", "--no-progress", "--out", str(out)]) == 0
    res = tmp_path / "eval.json"
    assert main(["eval", "--quantized", str(out), "--tasks", "wikitext2", "--ppl-tokens", "512", "--no-progress",
                 "--out", str(res)]) == 0
    got = json.loads(res.read_text())
    model, tok = load("smollm2-135m")
    ref = run_eval(actsparse.quantize(model, bits=8), tok, ["wikitext2"], ppl_tokens=512, progress=False)
    assert got["metrics"]["wikitext2"]["ppl"] == pytest.approx(ref.metrics["wikitext2"]["ppl"], rel=1e-6)
    assert "quantized" in got["model"]
    fresh, _ = load("smollm2-135m")
    assert isinstance(load_quantized(fresh, out).model.layers[0].mlp.down_proj, QuantLinear)
    assert main(["eval", "--model", "gemma3-270m", "--quantized", str(out), "--tasks", "wikitext2"]) == 2
    assert "holds another model's weights" in capsys.readouterr().err
