from __future__ import annotations

import json

import pytest

from benchmarks.predictor import add_tasks, build_parser

ARGS = ["--limit", "60", "--train-tokens", "16384", "--label-sparsity", "0.5", "--rank", "0.08", "--epochs", "8"]


def _file(tmp_path, tasks_at: tuple[float, ...]):
    rows = [{"method": "predictor", "target": t, "ppl": 50.0, "predictor": {"mean_recall": 0.6},
             **({"piqa": {"acc": 0.5}, "arc_easy": {"acc": 0.5}, "winogrande": {"acc": 0.5}} if t in tasks_at else {})}
            for t in (0.25, 0.5)]
    data = {"config": {"predictor_train_tokens": 16384, "task_limit": 60, "task_seed": 0, "window": 512},
            "predictor_config": {"rank": 0.08, "label": "topk", "selection": "topk", "epochs": 8, "lr": 3e-3,
                                 "seed": 0, "label_sparsity": 0.5}, "rows": rows}
    out = tmp_path / "predictor_m.json"
    out.write_text(json.dumps(data))
    return out, data


def test_add_tasks_nothing_to_do_keeps_the_file(tmp_path):
    out, data = _file(tmp_path, (0.25, 0.5))
    args = build_parser().parse_args([*ARGS, "--add-tasks", "--task-targets", "0.25"])
    assert add_tasks("m", args, out) == data  # returns before loading any model


def test_add_tasks_refuses_other_settings(tmp_path):
    out, _ = _file(tmp_path, (0.5,))
    args = build_parser().parse_args([*ARGS[:-1], "4", "--add-tasks", "--task-targets", "0.25"])
    with pytest.raises(SystemExit, match="--epochs 4"):
        add_tasks("m", args, out)
