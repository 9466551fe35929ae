from __future__ import annotations

import json

from benchmarks.studies.larosa import main, markdown


def _data() -> dict:
    cfg = {"model": "m", "command": "python benchmarks/studies/larosa.py --out x.json", "calibration_text": "c",
           "calib_tokens": 4096, "rotation_tokens": 16384, "evaluation_text": "e", "second_text": "l",
           "eval_tokens": 2048, "window": 512, "evaluation": "hooks", "sparsity": "target = every input"}
    rows = [{"variant": "dense", "target": None, "ppl_wikitext2": 10.0, "ppl_lambada": 20.0},
            {"variant": "larosa", "target": 0.5, "ppl_wikitext2": 12.5, "ppl_lambada": 21.0},
            {"variant": "topk", "target": 0.4, "ppl_wikitext2": 11.0, "ppl_lambada": 20.5}]
    return {"config": cfg, "rows": rows, "rotation_tokens_used": 16384}


def test_markdown_rows_in_target_order(tmp_path):
    md = markdown(_data())
    assert md.index("| topk | 0.40 | 11.00 | +1.00 | 20.50 | +0.50 |") < md.index("| larosa | 0.50 | 12.50 | +2.50 |")
    out = tmp_path / "l.json"
    out.write_text(json.dumps(_data()))
    assert main(["--render", "--out", str(out)]) == 0
    assert out.with_suffix(".md").read_text() == md
