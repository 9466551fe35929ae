"""Plots of committed benchmark files (no measurement here): `python -m benchmarks.plots`."""

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


def plot_heads(files: dict[str, str], out: str) -> Path:
    """Decode speedup over dense against batch, one line per context and head variant; one panel
    per GPU file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(files), figsize=(5.2 * len(files), 4), squeeze=False)
    for ax, (title, f) in zip(axes[0], files.items()):
        d = json.loads(Path(f).read_text())
        rows = [r for r in d["rows"] if "heads" in r["variant"] and not r.get("superseded") and r.get("vs_dense")]
        for (variant, ctx) in sorted({(r["variant"], r["context"]) for r in rows}):
            pts = sorted((r["batch"], r["vs_dense"]) for r in rows if r["variant"] == variant and r["context"] == ctx)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{variant}, context {ctx // 1024}k")
        ideal = sorted({(r["batch"], r["context"], r["ideal_x"]) for r in rows if r["variant"] == "heads-0.5"})
        for b, c, x in ideal:
            ax.plot([b], [x], "k_", ms=14)
        ax.axhline(1.0, c="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("tok/s over dense inductor + CUDA graphs")
        ax.set_title(f"{title}\n{d['gpu']} (black ticks: bytes ideal of heads-0.5)", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return Path(out)


HEAD_FILES = {"head routing, Llama-3-8B shape, minimal loop": "benchmarks/results/e2e_heads_h200.json",
              "same, second machine (heads-1.0: no head skipped)": "benchmarks/results/e2e_heads_h100.json"}

E2E_FILES = {"HF generate, static cache": "benchmarks/results/e2e_h100.json",
             "minimal loop (no host sync per token)": "benchmarks/results/e2e_lean_h100.json",
             "HF generate, batches": "benchmarks/results/e2e_batch_h100.json",
             "HF generate, batches, second run (another machine, slower host)": "benchmarks/results/e2e_batch_rerun_h100.json",
             "minimal loop, batches": "benchmarks/results/e2e_lean_batch_h100.json",
             "minimal loop, 50%, after graph-timed autotuning": "benchmarks/results/e2e_lean_graphtune_h100.json",
             "HF generate, after graph-timed autotuning (another machine)": "benchmarks/results/e2e_generate_graphtune_h100.json",
             "actsparse.greedy_decode (one static cache kept between calls)": "benchmarks/results/e2e_greedy_h100.json",
             "minimal loop, one static cache for every run (same machine as the row above)": "benchmarks/results/e2e_lean_cache_h100.json"}


def e2e_markdown(files: dict[str, str] = E2E_FILES, probe: str | None = "benchmarks/results/gpu_probe_overhead_h100.json") -> str:
    """The end-to-end table from the committed e2e JSON files (and the per-step breakdown of
    the GPU probe, where present)."""
    lines = []
    for title, f in files.items():
        if not Path(f).exists():
            continue
        d = json.loads(Path(f).read_text())
        lines += [f"### {title}", "", f"`{d['command']}` ({d['device']}, torch {d['torch']})", "",
                  "| batch | variant | tok/s | vs dense | roofline tok/s (dense weight bytes) |", "|---|---|---|---|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['batch']} | {r['variant']} | {r['tokens_per_s']:.1f} | {r.get('speedup', 1.0):.2f} | "
                         f"{r['roofline_tokens_per_s']:.0f} |")
        lines.append("")
    if probe and Path(probe).exists():
        d = json.loads(Path(probe).read_text())
        lines += ["### Where a decode step's time goes (batch 1, 32 layers, 50%)", "",
                  f"`{d['command']}`: wall time per step with a host sync per step (as HF generate "
                  "does) and without one, host time to issue a step, and the GPU kernels' summed time "
                  "(torch.profiler).", "",
                  "| variant | wall, sync per step (ms) | wall, no sync (ms) | host issue (ms) | kernels (ms) |",
                  "|---|---|---|---|---|"]
        for name, r in d["profile"]["batch1"].items():
            k = r.get("kernel_us_per_step")
            lines.append(f"| {name} | {r['wall_ms_per_step']:.2f} | {r['wall_ms_per_step_no_sync']:.2f} | "
                         f"{r['host_issue_ms_per_step']:.2f} | {'-' if k is None else f'{k / 1e3:.2f}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "benchmarks/results/e2e_h100.png"
    plot_e2e(["benchmarks/results/e2e_h100.json", "benchmarks/results/e2e_lean_h100.json"], out)
    md = Path(out).with_suffix(".md")
    md.write_text("# End-to-end decode, random-weight Llama-3-8B shape, bf16, 128 new tokens\n\n"
                  "Dense: Inductor with CUDA graphs; sparse: `actsparse.backend(plan, cudagraphs=True)`; "
                  "both in the same run. Uniform TEAL thresholds calibrated per linear input on 512 random "
                  "tokens through the same model. Written by `python -m benchmarks.plots` from the "
                  "JSON files named below.\n\n" + e2e_markdown())
    heads = plot_heads(HEAD_FILES, "benchmarks/results/e2e_heads.png")
    print(f"wrote {out}, {md} and {heads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
