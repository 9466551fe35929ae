"""How much consecutive decode tokens share their active input channels, per masked linear.

The cached-weight index operator copies only the rows that enter the active set at each step,
so its benefit hangs on this overlap: the fraction of a step's active channels that were
also active at the previous step. Measured here on real text: greedy decoding with a static
cache, the plan's masks applied eagerly by hooks (the masks the backend applies), batch 1.

    python -m benchmarks.overlap --model smollm2-135m --sparsity 0.5 --out benchmarks/results/overlap_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


def record_masks(model, plan, ids: torch.Tensor, new_tokens: int) -> dict[str, list[torch.Tensor]]:
    """Per masked linear, its input mask at each decode step (prefill excluded)."""
    from transformers import StaticCache

    from actsparse.ops.reference import input_mask, wina_cutoffs

    masks: dict[str, list[torch.Tensor]] = {n: [] for n in plan.thresholds}
    state = {"decode": False}
    hooks = []
    for name, t in plan.thresholds.items():
        mod = model.get_submodule(name)
        tau = wina_cutoffs(mod.weight, t) if plan.score == "wina" else None

        def pre(m, args, name=name, t=t, tau=tau):
            x = args[0].reshape(-1, args[0].shape[-1])
            mask = (x.abs().float() > tau) if tau is not None else input_mask(x, t, False)
            if state["decode"]:
                masks[name].append(mask[-1].clone())
            return (torch.where(mask, x, torch.zeros((), dtype=x.dtype)).view_as(args[0]),) + tuple(args[1:])
        hooks.append(mod.register_forward_pre_hook(pre))
    n = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + new_tokens + 2)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n))
            tok = out.logits[:, -1:].argmax(-1)
            state["decode"] = True
            for i in range(new_tokens):
                out = model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([n + i]))
                tok = out.logits[:, -1:].argmax(-1)
    finally:
        for h in hooks:
            h.remove()
    return masks


def overlaps(seq: list[torch.Tensor]) -> list[float]:
    """|A_t & A_{t-1}| / |A_t| for each step t >= 1 (1.0 where A_t is empty)."""
    out = []
    for prev, cur in zip(seq, seq[1:]):
        active = int(cur.sum())
        out.append(float((cur & prev).sum()) / active if active else 1.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--method", default="teal")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import actsparse
    from actsparse.calibration.data import wikitext2_split
    from actsparse.models import load

    model, tok = load(args.model, dtype=torch.float32)
    model.eval()
    calib, evaluation, split = wikitext2_split(args.data)
    plan = actsparse.calibrate(model, calib, method=args.method, sparsity=args.sparsity, tokenizer=tok,
                               token_budget=args.calib_tokens, progress=False)
    ids = tok(evaluation[:4000], return_tensors="pt").input_ids[:, :args.prompt_tokens]
    masks = record_masks(model, plan, ids, args.new_tokens)
    rows = []
    for name, seq in masks.items():
        ov = overlaps(seq)
        rows.append({"module": name, "role": plan.roles.get(name), "in_features": int(seq[0].numel()),
                     "density": round(statistics.mean(float(m.float().mean()) for m in seq), 4),
                     "overlap_mean": round(statistics.mean(ov), 4), "overlap_min": round(min(ov), 4)})
    by_role: dict[str, Any] = {}
    for role in sorted({r["role"] for r in rows if r["role"]}):
        sel = [r for r in rows if r["role"] == role]
        by_role[role] = {"overlap_mean": round(statistics.mean(r["overlap_mean"] for r in sel), 4),
                         "density": round(statistics.mean(r["density"] for r in sel), 4), "linears": len(sel)}
    result = {
        "command": "python -m benchmarks.overlap " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "plan": {"method": plan.method, "target": plan.target,
                                      "overall_sparsity": plan.overall_sparsity},
        "calibration_text": split["calibration"], "prompt_text": split["evaluation"],
        "prompt_tokens": ids.shape[1], "decode_steps": args.new_tokens,
        "overlap_definition": "fraction of a step's active input channels also active at the previous step",
        "overall_overlap_mean": round(statistics.mean(r["overlap_mean"] for r in rows), 4),
        "by_role": by_role, "rows": rows,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        _plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("overall_overlap_mean", "by_role")}, indent=1))
    return 0


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for role in result["by_role"]:
        sel = [r for r in result["rows"] if r["role"] == role]
        ax.plot(range(len(sel)), [r["overlap_mean"] for r in sel], marker="o", ms=3, label=role)
    ax.set_xlabel("linear of that role, in layer order")
    ax.set_ylabel("overlap of consecutive tokens' active channels")
    ax.set_title(f"{result['model']}, {result['plan']['method']} {result['plan']['target']:.0%}")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
