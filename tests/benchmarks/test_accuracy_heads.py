"""benchmarks.accuracy_heads: rows, target check, rendering and options, without loading a model."""

from __future__ import annotations

import json

import pytest

from benchmarks.accuracy_heads import (annotate, build_parser, finish, heads_summary, main, markdown, overall,
                                       plan_hash, target_check, todo, wanted_keys)

TASKS = ("piqa", "arc_easy", "winogrande")


def _heads(target: float, density: float, units: int = 3) -> dict:
    keep = [units, 1, 2, 1]
    return {"unit": "group" if units == 3 else "head", "units": units, "heads_per_unit": 3 if units == 3 else 1,
            "allocation": "greedy", "tokens": 8192, "target_density": target, "density": density, "keep": keep,
            "dense_layers": 1, "recall_k": 2, "recall": 0.8, "error": 0.25, "oracle_error": 0.2}


def _row(lin, dens, ppl, tasks=True, achieved=None):
    from benchmarks.accuracy_heads import label

    r = {"model": "m", "label": label((lin, dens)), "linear_method": None if lin is None else "teal-greedy",
         "linear_target": lin, "head_density": dens, "linear_sparsity": lin or 0.0,
         "heads": None if dens is None else _heads(dens, achieved if achieved is not None else dens), "ppl": ppl}
    if tasks:
        r.update({t: {"acc": 0.5, "n": 60} for t in TASKS})
    return r


def _rows(ratio_075=1.02, ratio_05=1.10, ratio_03=1.50):
    base = 40.0
    return [_row(None, None, 30.0), _row(None, 1.0, 30.0), _row(None, 0.75, 33.0, achieved=0.744),
            _row(None, 0.5, 45.0), _row(None, 0.3, 90.0, achieved=0.3),
            _row(0.4, None, base), _row(0.4, 0.75, base * ratio_075, achieved=0.744),
            _row(0.4, 0.5, base * ratio_05), _row(0.4, 0.3, base * ratio_03)]


def _result(rows_a, rows_b=None) -> dict:
    models = {"a": {"rows": rows_a, "layout": {"num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "layers": 4}}}
    if rows_b is not None:
        models["b"] = {"rows": rows_b, "layout": {"num_heads": 4, "num_kv_heads": 1, "head_dim": 256, "layers": 4}}
    return {"commands": ["python -m benchmarks.accuracy_heads --models a b --no-tasks",
                         "python -m benchmarks.accuracy_heads --models a b --resume"],
            "config": {"tasks": list(TASKS), "task_limit": 60, "eval_tokens": 4096, "window": 512,
                       "calib_tokens": 4096, "head_tokens": 8192, "calibration_articles": 10, "greedy_step": 0.02,
                       "greedy_tokens": 256, "seed": 0, "allocation": "greedy", "linear_method": "teal-greedy"},
            "models": models}


def test_wanted_keys_order_and_combinations():
    keys = wanted_keys([0.5, 1.0, 0.75], [0.5, 0.4])
    assert keys == [(None, None), (None, 1.0), (None, 0.75), (None, 0.5),
                    (0.4, None), (0.4, 0.75), (0.4, 0.5), (0.5, None), (0.5, 0.75), (0.5, 0.5)]


def test_todo_adds_missing_rows_and_tasks():
    rows = [_row(None, None, 30.0), _row(None, 0.5, 40.0, tasks=False)]
    keys = [(None, None), (None, 0.5), (0.4, None)]
    assert todo(rows, keys, tasks=False) == [(0.4, None)]
    assert todo(rows, keys, tasks=True) == [(None, 0.5), (0.4, None)]


def test_annotate_increase_and_ratio_to_the_linear_plan():
    rows = _rows()
    annotate(rows)
    by = {r["label"]: r for r in rows}
    assert by["dense"]["ppl_increase"] == 0.0
    assert by["heads 0.50"]["ppl_increase"] == 15.0
    assert by["heads 0.50"]["ppl_ratio_vs_dense"] == 1.5
    assert by["heads 0.50"]["ppl_ratio_vs_linear"] is None  # no linear plan
    assert by["teal-greedy 40%"]["ppl_ratio_vs_linear"] is None  # the plan itself
    assert by["teal-greedy 40% + heads 0.50"]["ppl_ratio_vs_linear"] == 1.1


def test_target_met():
    chk = target_check(_rows(ratio_05=1.04))
    assert chk["met"] is True and chk["ratio"] == 1.04
    assert chk["holds_at"] == 0.5 and chk["crossing_estimate"] is not None  # 0.3 breaks it: 1.5 > 1.05


def test_target_not_met_reports_where_it_holds():
    chk = target_check(_rows(ratio_075=1.02, ratio_05=1.10))
    assert chk["met"] is False and chk["ratio"] == 1.1
    assert chk["holds_at"] == 0.75 and chk["holds_at_achieved"] == 0.744
    # log-linear between (0.744, 1.02) and (0.5, 1.10): crosses 1.05 in between
    assert 0.5 < chk["crossing_estimate"] < 0.744
    assert chk["ratios"] == {"0.75": 1.02, "0.50": 1.1, "0.30": 1.5}


def test_target_holds_nowhere_and_missing_rows():
    chk = target_check(_rows(ratio_075=1.2))
    assert chk["met"] is False and chk["holds_at"] is None
    assert 0.744 < chk["crossing_estimate"] < 1.0  # between the plan alone (1.0, ratio 1) and 0.75
    assert target_check([_row(None, None, 30.0)])["met"] is None  # no linear row: undecided


def test_overall_needs_every_model():
    assert overall({"a": {"met": True}, "b": {"met": True}}) == {"models": ["a", "b"], "met": True, "complete": True}
    assert overall({"a": {"met": True}, "b": {"met": False}})["met"] is False
    assert overall({"a": {"met": True}, "b": {"met": None}}) == {"models": ["a", "b"], "met": False,
                                                                  "complete": False}


def test_markdown_tables_target_and_single_kv_note():
    res = finish(_result(_rows(ratio_05=1.04), _rows(ratio_05=1.2)))
    md = markdown(res)
    assert "`python -m benchmarks.accuracy_heads --models a b --no-tasks`" in md
    assert "`python -m benchmarks.accuracy_heads --models a b --resume`" in md
    assert "perplexity within 5% of that plan alone on both models" in md
    assert "- a: teal-greedy 40% alone 40.00;" in md and "ratio 1.040 -> met" in md
    assert "ratio 1.200 -> not met" in md and "Holds down to head density 0.75 (achieved 0.744" in md
    assert "**Target not met** (computed from the rows)." in md
    assert ("| teal-greedy 40% + heads 0.50 | 0.400 | 0.50 / 0.500 | 41.60 | +11.60 | 1.387 | 1.040 | "
            "0.500 | 0.500 | 0.500 | 0.800 (2) | 0.2500 (0.2000) |") in md
    assert "| dense | 0.000 |  | 30.00 |  | 1.000 |  | 0.500 | 0.500 | 0.500 |  |  |" in md
    assert "- 0.75 (achieved 0.744, 1 of 4 layers dense): 3 1 2 1" in md
    a, b = md.split("## b")
    assert "single KV head" not in a and "b has a single KV head" in b and "no KV-cache bytes" in b


def test_markdown_target_met_on_both():
    md = markdown(finish(_result(_rows(ratio_05=1.04), _rows(ratio_05=1.05))))
    assert "**Target met** (computed from the rows)." in md


def test_render_only_rewrites_md_and_png(tmp_path):
    out = tmp_path / "accuracy_heads.json"
    out.write_text(json.dumps(_result(_rows())))
    before = out.read_text()
    assert main(["--render", "--out", str(out)]) == 0
    assert out.read_text() == before
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| heads 0.30 | 0.000 | 0.30 / 0.300 | 90.00 | +60.00 | 3.000 |" in out.with_suffix(".md").read_text()


def test_heads_summary_from_plan_info():
    info = {"unit": "head", "units": 4, "heads_per_unit": 1, "allocation": "greedy", "tokens": 8192,
            "target_density": 0.5, "density": 0.5,
            "layers": {"l0.o": {"keep": 4, "error": 0.0, "oracle_error": 0.0, "recall_at_target": 0.9},
                       "l1.o": {"keep": 0 + 1, "error": 0.4, "oracle_error": 0.3, "recall_at_target": 0.7}}}
    s = heads_summary(info)
    assert s["keep"] == [4, 1] and s["dense_layers"] == 1 and s["recall_k"] == 2
    assert s["recall"] == 0.8 and s["error"] == 0.2 and s["oracle_error"] == 0.15


def test_plan_hash_sees_thresholds_not_empty_rules():
    from actsparse import SparsityPlan

    a, b = SparsityPlan(thresholds={"x": 0.1}), SparsityPlan(thresholds={"x": 0.2})
    assert plan_hash(a) != plan_hash(b)
    empty = SparsityPlan()
    h = plan_hash(empty)
    empty.thresholds  # noqa: B018 - reading it adds an empty InputThresholds rule
    assert plan_hash(empty) == h


@pytest.mark.parametrize("argv, message", [
    (["--densities", "0"], "a head density is in (0, 1]"),
    (["--densities", "1.5"], "a head density is in (0, 1]"),
    (["--linear-targets", "1.0"], "a linear-plan target is in (0, 1)"),
    (["--limit", "0"], "must be at least 1"),
])
def test_option_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_tasks_flag():
    assert build_parser().parse_args([]).tasks is True
    assert build_parser().parse_args(["--no-tasks"]).tasks is False


def test_render_needs_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--render", "--out", str(tmp_path / "none.json")])
    assert "does not exist" in capsys.readouterr().err


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "accuracy_heads.json"
    out.write_text(json.dumps(_result(_rows())))
    with pytest.raises(SystemExit, match=r"--eval-tokens 2048 \(the file has 4096\)"):
        main(["--resume", "--eval-tokens", "2048", "--models", "a", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--limit 30 \(the file's tasks used 60\)"):
        main(["--resume", "--limit", "30", "--models", "a", "--out", str(out)])
    assert json.loads(out.read_text()) == _result(_rows())  # refused before writing anything
