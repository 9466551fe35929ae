"""`actsparse train` on a tiny random model: files written, rebuild works, errors are clear."""

from __future__ import annotations

import json

import pytest
import torch

from actsparse.cli import main
from actsparse.models import tiny
from actsparse.plan import SparsityPlan
from actsparse.train import rebuild


def test_train_writes_adapters_plan_and_summary(tmp_path, capsys):
    out, js = tmp_path / "a.safetensors", tmp_path / "s.json"
    rc = main(["train", "--model", "tiny:llama", "--variant", "drelu", "--steps", "3", "--batch-size", "2",
               "--seq-len", "8", "--samples", "4", "--held-out", "2", "--rank", "2", "--out", str(out),
               "--json", str(js), "--no-progress"])
    assert rc == 0 and "KL" in capsys.readouterr().out
    s = json.loads(js.read_text())
    assert s["tokens"] == 3 * 2 * 8 and len(s["kl_per_step"]) == 3 and 0 < s["after"]["mlp_sparsity"] < 1
    model, plan = rebuild(tiny("llama"), out)
    saved = SparsityPlan.load(s["plan"], model=model)
    assert saved.rule_names() == plan.rule_names() and saved.info["variant"] == "drelu"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("argv, msg", [(["--variant", "gelu"], "unknown --variant 'gelu'"),
                                       (["--steps", "0"], "steps must be"),
                                       (["--dtype", "int8"], "--dtype must be"),
                                       (["--model", "nope"], "cannot load model 'nope'")])
def test_user_errors_exit_2(tmp_path, capsys, argv, msg):
    rc = main(["train", "--out", str(tmp_path / "a.safetensors"), "--no-progress"] + argv)
    assert rc == 2 and msg in capsys.readouterr().err
