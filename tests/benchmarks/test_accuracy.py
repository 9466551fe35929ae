from __future__ import annotations

import json

from benchmarks.accuracy import main, mlp_bytes

TASKS = ["piqa", "arc_easy", "winogrande"]


def _acc(v: float) -> dict:
    return {t: {"acc": v, "n": 60} for t in TASKS}


def _row(method: str, target: float | None, ppl: float, **extra) -> dict:
    return {"model": "m", "method": method, "target": target, "overall_sparsity": target or 0.0,
            "effective_sparsity": target or 0.0, "ppl": ppl, **extra}


def _result() -> dict:
    rows = [_row("dense", None, 10.0, **_acc(0.6)), _row("cats", 0.5, 12.0, **_acc(0.55)),
            _row("teal", 0.5, 13.0, **_acc(0.5)), _row("teal-greedy", 0.5, 11.0, **_acc(0.52))]
    return {"config": {"command": "python -m actsparse.bench.accuracy", "tasks": TASKS, "task_limit": 60},
            "models": {"m": rows}, "target_check": {}}


def _predictor() -> dict:
    pred = [{"method": "predictor", "target": t, "effective_sparsity": 0.75 * t, "ppl": 20.0 + t,
             "mlp_bytes": {"ratio": 1.04 - t}, "predictor": {"rank": 4}, **(_acc(0.4) if t == 0.5 else {})}
            for t in (0.25, 0.5)]
    pred[0].update(_acc(0.45), tasks_added_by="python -m actsparse.bench.predictor --add-tasks")
    return {"config": {"command": "python -m actsparse.bench.predictor --models m", "task_limit": 60},
            "predictor_config": {"rank": 0.08, "label": "topk", "label_sparsity": 0.5, "selection": "topk"},
            "rows": [{"method": "dense", "target": None, "ppl": 10.0, "mlp_bytes": {"ratio": 1.0}},
                     {"method": "cats", "target": 0.5, "ppl": 12.0, "mlp_bytes": {"ratio": 0.669}}, *pred],
            "bytes": {"teal@0.5": {"ratio": 0.5}, "cats@0.5": {"ratio": 0.667}}}


def test_mlp_bytes_sources():
    rows, pred = _result()["models"]["m"], _predictor()
    assert mlp_bytes(rows[0], pred) == (1.0, "eval")
    assert mlp_bytes(rows[1], pred) == (0.669, "eval")  # same row measured on the same text
    assert mlp_bytes({**rows[1], "ppl": 99.0}, pred) == (0.667, "calib")  # not the same plan: calibration
    assert mlp_bytes(rows[2], pred) == (0.5, "calib")
    assert mlp_bytes(rows[3], pred) == (None, "")
    assert mlp_bytes(rows[2], None) == (None, "")


def test_render_adds_bytes_and_predictor_rows(tmp_path):
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps(_result()))
    before = out.read_text()
    (tmp_path / "predictor_m.json").write_text(json.dumps(_predictor()))
    assert main(["--render", "--out", str(out)]) == 0
    assert out.read_text() == before  # render only: nothing evaluated, the JSON untouched
    md = out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| cats | 0.50 | 0.500 | 0.500 | 0.669 | 12.00 | +2.00 |" in md
    assert "| teal | 0.50 | 0.500 | 0.500 | 0.500 (cal.) | 13.00 |" in md
    assert "| teal-greedy | 0.50 | 0.500 | 0.500 | n/a | 11.00 |" in md
    assert "n/a (teal-greedy): not derivable from stored data" in md
    assert f"### Learned predictor (from `{tmp_path.name}/predictor_m.json`)" in md
    assert "python -m actsparse.bench.predictor --models m" in md
    assert "tasks at 0.25 added by `python -m actsparse.bench.predictor --add-tasks`" in md
    assert "| predictor | 0.25 | 0.188 | 0.790 | 20.25 | +10.25 | 0.450 | 0.450 | 0.450 |" in md
    assert "| predictor | 0.50 | 0.375 | 0.540 | 20.50 | +10.50 | 0.400 | 0.400 | 0.400 |" in md


def test_render_without_predictor_file(tmp_path):
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps(_result()))
    assert main(["--render", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "| dense |  | 0.000 | 0.000 | 1.000 | 10.00 |" in md
    assert "| cats | 0.50 | 0.500 | 0.500 | n/a | 12.00 |" in md
    assert "Learned predictor" not in md


def test_render_second_text_table(tmp_path):
    res = _result()
    rows = res["models"]["m"]
    rows[0]["second_text"] = {"name": "lambada", "ppl": 20.0}
    rows[2].update(masked_sparsity=0.51, second_text={"name": "lambada", "ppl": 30.0, "masked_sparsity": 0.528})
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps(res))
    assert main(["--render", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "### Second text (lambada): achieved sparsity beside the target" in md
    assert "| teal | 0.50 | 0.510 | 0.528 | +0.028 | 30.00 | +10.00 |" in md


def test_observer_masked_sparsity_counts_masked_linears_only():
    import torch

    from benchmarks.accuracy import MaskObserver

    obs = MaskObserver(total_params=400)
    w = torch.zeros(10, 10)  # 100 of the 400 parameters are masked
    obs._add(w, torch.tensor([[True, False, False, False]] * 2))
    assert obs.sparsity() == 0.75 * 100 / 400
    assert obs.masked_sparsity() == 0.75
    obs.reset()
    assert obs.masked_sparsity() == 0.0 and obs.active


def test_observer_counts_lowrank_factors_as_read():
    import torch

    from actsparse.ops import constants
    from benchmarks.accuracy import MaskObserver

    obs = MaskObserver(total_params=400)
    obs._add(torch.zeros(10, 10), torch.tensor([[True, False, False, False]]))
    scope = constants.ConstantScope()
    key = scope.add("rsparse:x", torch.zeros(10, 1), torch.zeros(1, 10))  # rank 1: 20 weights read per token
    try:
        obs.lowrank_factors(None, key, 10, 0.1)
        obs.lowrank_factors(None, key, 10, 0.1)  # every call reads the same factors: counted once
    finally:
        constants.release(tuple(scope.keys))
    assert obs.sparsity() == (75 - 20) / 400 and obs.masked_sparsity() == 0.75
    obs.reset()
    assert obs.sparsity() == 0.0


def test_plan_summary_keeps_the_rsparse_split():
    from types import SimpleNamespace

    from benchmarks.accuracy import _plan_summary

    info = {"tokens": 4096, "rsparse": {"base": "teal-greedy", "lowrank_fraction_of_dense": 0.003,
                                        "mask_sparsity": 0.503, "ranked_linears": 12, "tokens": 512}}
    got = _plan_summary(SimpleNamespace(info=info))
    assert got == {"tokens": 4096, "rsparse": {"base": "teal-greedy", "lowrank_fraction_of_dense": 0.003,
                                               "mask_sparsity": 0.503, "ranked_linears": 12}}
