"""benchmarks.index_step reads measured overlaps, including a multi-variant overlap result."""

from __future__ import annotations

import json

from benchmarks.index_step import load_overlap_json


def test_load_overlap_json_forms(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"sites": {"x": 0.8, "y": {"overlap": 0.6, "rows": 8, "cols": 4}}}))
    got = {e["name"]: e for e in load_overlap_json(str(p))}
    assert got["x"]["overlap"] == 0.8 and got["y"]["rows"] == 8
    p.write_text(json.dumps({"rows": [{"variant": "relu", "overlap_mlp_down": 0.63, "mlp_sparsity": 0.67},
                                      {"variant": "none", "overlap_mlp_down": None, "mlp_sparsity": None}]}))
    assert load_overlap_json(str(p)) == [{"name": "relu", "overlap": 0.63, "sparsity": 0.67}]
