"""The TEAL comparison's report table (the GPU timing itself runs on the GPU machine)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from benchmarks.peers.teal_kernels import main, table  # noqa: E402


def test_table_marks_the_chosen_family_and_missing_cells():
    rows = [dict(shape="q_o", sparsity=0.5, ours_x=1.4, teal_x=1.3, ideal_x=2.0, ours_family="predicated"),
            dict(shape="q_o", sparsity=0.9, ours_x=2.4, teal_x=None, ideal_x=10.0, ours_family="compact"),
            dict(shape="k_v", sparsity=0.9, ours_x=1.5, teal_x=1.6, ideal_x=10.0, ours_family="compact")]
    lines = table(rows).splitlines()
    assert lines[0].endswith("| 50% | 90% |")
    assert lines[2] == "| q_o | 1.40 (p) / 1.30 / 2.00 | 2.40 (c) / - / 10.00 |"
    assert lines[3] == "| k_v | - | 1.50 (c) / 1.60 / 10.00 |"


def test_families_option_is_validated(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "x.json", "--families", "teal"])
    assert "invalid choice" in capsys.readouterr().err
