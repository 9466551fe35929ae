"""Plots of committed benchmark files (no measurement here): `python -m actsparse.bench.plots`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_e2e(files: list[str], out: str) -> Path:
    """Decode tokens/s against target sparsity, one line per decode loop, with the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    roof = None
    for f in files:
        d = json.loads(Path(f).read_text())
        rows = [r for r in d["rows"] if r.get("batch", 1) == 1]
        pts = sorted((r.get("target_sparsity", 0.0), r["tokens_per_s"]) for r in rows)
        loop = rows[0].get("loop", "generate")
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "o-",
                label=f"{'HF generate' if loop == 'generate' else 'minimal loop'} (dense at 0%)")
        roof = rows[0]["roofline_tokens_per_s"]
        device = d["device"]
    if roof:
        ax.axhline(roof, ls="--", c="gray", label=f"dense roofline {roof:.0f} tok/s")
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title(f"Llama-3-8B shapes, bf16, {device}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "benchmarks/e2e_h100.png"
    plot_e2e(["benchmarks/e2e_h100.json", "benchmarks/e2e_lean_h100.json"], out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
