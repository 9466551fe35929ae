"""How much consecutive decode tokens share their active input channels, per masked linear.

The cached-weight index operator copies only the rows that enter the active set at each step,
so its benefit hangs on this overlap: the fraction of a step's active channels that were
also active at the previous step. Measured here on real text: greedy decoding with a static
cache, the plan's masks applied eagerly by hooks (the masks the backend applies), batch 1.

    python -m benchmarks.overlap --model smollm2-135m --sparsity 0.5 --out benchmarks/results/overlap_smollm2-135m.json

Relufied models (``--adapters``: adapter files of ``benchmarks.relufy``, each rebuilt from the
base model): the exact plan's masks are the activation's own zeros, the nonzero inputs of
each MLP's down projection (the neurons whose up row and down column the gated-MLP kernel
reads). Dense SiLU has no zeros; ``--topk-density`` gives it a comparator at a matched
density: per step, the largest ``|h|`` of each down-projection input (observed, not applied).
With either option the result is one row per variant (TEAL plan first), each with its
overlaps by role:

    python -m benchmarks.overlap --sparsity 0.5 --topk-density 0.34 0.2 \\
        --adapters relu.adapters.safetensors shifted.adapters.safetensors \\
        --out benchmarks/results/overlap_relufied_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


def exact_modules(plan) -> list[str]:
    """The down projections of the plan's ``exact`` rule (relufied MLPs), if any."""
    from actsparse.plan.rules.exact import ExactZeros

    rule = plan.rule(ExactZeros) if plan is not None else None
    return sorted(rule.modules()) if rule is not None else []


def record_masks(model, plan, ids: torch.Tensor, new_tokens: int,
                 topk: dict[str, float] | None = None) -> dict[str, list[torch.Tensor]]:
    """Per masked linear, its input mask at each decode step (prefill excluded).

    ``plan`` may be None. Its thresholds are applied (TEAL); its ``exact`` modules record their
    input's nonzeros (the activation already made the zeros). ``topk``: module -> density,
    record the ``round(density * in_features)`` largest ``|x|`` of that input without
    changing it."""
    from transformers import StaticCache

    from actsparse.ops.reference import input_mask, wina_cutoffs

    thresholds = plan.thresholds if plan is not None else {}
    observed = {n: ("nonzero", 0.0) for n in exact_modules(plan)} | {n: ("topk", d) for n, d in (topk or {}).items()}
    masks: dict[str, list[torch.Tensor]] = {n: [] for n in [*thresholds, *observed]}
    state = {"decode": False}
    hooks = []
    for name, (how, density) in observed.items():
        def watch(m, args, name=name, how=how, density=density):
            if not state["decode"]:
                return None
            x = args[0].reshape(-1, args[0].shape[-1])[-1]
            if how == "nonzero":
                mask = x != 0
            else:
                mask = torch.zeros(x.numel(), dtype=torch.bool)
                mask[x.abs().topk(max(1, round(density * x.numel()))).indices] = True
            masks[name].append(mask)
            return None
        hooks.append(model.get_submodule(name).register_forward_pre_hook(watch))
    for name, t in thresholds.items():
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


def summarize(masks: dict[str, list[torch.Tensor]], roles: dict[str, str | None]) -> dict[str, Any]:
    """Per linear and per role: mean density and mean / min overlap over the decode steps."""
    rows = []
    for name, seq in masks.items():
        ov = overlaps(seq)
        rows.append({"module": name, "role": roles.get(name), "in_features": int(seq[0].numel()),
                     "density": round(statistics.mean(float(m.float().mean()) for m in seq), 4),
                     "overlap_mean": round(statistics.mean(ov), 4), "overlap_min": round(min(ov), 4)})
    by_role: dict[str, Any] = {}
    for role in sorted({r["role"] for r in rows if r["role"]}):
        sel = [r for r in rows if r["role"] == role]
        by_role[role] = {"overlap_mean": round(statistics.mean(r["overlap_mean"] for r in sel), 4),
                         "density": round(statistics.mean(r["density"] for r in sel), 4), "linears": len(sel)}
    return {"overall_overlap_mean": round(statistics.mean(r["overlap_mean"] for r in rows), 4),
            "by_role": by_role, "rows": rows}


def down_projections(model) -> list[str]:
    from actsparse.train import gated_mlps

    return [m.part("down_proj") for m in gated_mlps(model)]


def variant_row(label: str, summary: dict[str, Any], **extra) -> dict[str, Any]:
    """One variant of the multi-variant result: MLP-down figures first (the neurons)."""
    down = summary["by_role"].get("mlp_down", {})
    return {"variant": label, "mlp_sparsity": round(1 - down["density"], 4) if down else None,
            "overlap_mlp_down": down.get("overlap_mean"),
            # what independent draws at this density would overlap: the lift over chance
            "overlap_if_independent": down.get("density"), **extra,
            "overall_overlap_mean": summary["overall_overlap_mean"], "by_role": summary["by_role"],
            "linears": summary["rows"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--method", default="teal")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--data", default=None)
    p.add_argument("--adapters", nargs="+", default=[],
                   help="relufied variants: adapter files (benchmarks.relufy), each rebuilt from the base model")
    p.add_argument("--topk-density", type=float, nargs="+", default=[],
                   help="dense model: overlap of the top-k neurons of each MLP at these densities")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for d in args.topk_density:
        if not 0.0 < d <= 1.0:
            p.error(f"--topk-density values must be in (0, 1], got {d}")
    for a in args.adapters:
        if not Path(a).is_file():
            p.error(f"--adapters: no file {a}")

    import actsparse
    from actsparse.calibration.data import wikitext2_split
    from actsparse.models import load

    model, tok = load(args.model, dtype=torch.float32)
    model.eval()
    calib, evaluation, split = wikitext2_split(args.data)
    plan = actsparse.calibrate(model, calib, method=args.method, sparsity=args.sparsity, tokenizer=tok,
                               token_budget=args.calib_tokens, progress=False)
    ids = tok(evaluation[:4000], return_tensors="pt").input_ids[:, :args.prompt_tokens]
    summary = summarize(record_masks(model, plan, ids, args.new_tokens), plan.roles)
    command = "python -m benchmarks.overlap " + " ".join(argv if argv is not None else sys.argv[1:])
    common = {"command": command, "model": args.model,
              "calibration_text": split["calibration"], "prompt_text": split["evaluation"],
              "prompt_tokens": ids.shape[1], "decode_steps": args.new_tokens,
              "overlap_definition": "fraction of a step's active input channels also active at the previous step"}
    if args.adapters or args.topk_density:
        result = multi_variant(model, plan, ids, args, summary, common)
    else:
        result = {**common, "plan": {"method": plan.method, "target": plan.target,
                                     "overall_sparsity": plan.overall_sparsity}, **summary}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        if "rows" in result and "by_role" in result:
            _plot(result, out.with_suffix(".png"))
    if "by_role" in result:
        print(json.dumps({k: result[k] for k in ("overall_overlap_mean", "by_role")}, indent=1))
    else:
        for r in result["rows"]:
            print(f"{r['variant']:>40}: MLP sparsity {r['mlp_sparsity']}, MLP-down overlap {r['overlap_mlp_down']}")
    return 0


def multi_variant(model, plan, ids, args, teal: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """The TEAL plan, dense top-k comparators and relufied variants, one row each."""
    import copy
    import os
    import platform

    from actsparse.train import read_adapters, rebuild

    rows = [variant_row(f"{args.method} {args.sparsity:.0%} (training-free, SiLU)", teal,
                        plan={"method": plan.method, "target": plan.target,
                              "overall_sparsity": plan.overall_sparsity})]
    downs = down_projections(model)
    for d in args.topk_density:
        masks = record_masks(model, None, ids, args.new_tokens, topk={n: d for n in downs})
        rows.append(variant_row(f"dense SiLU, top {d:.0%} neurons per step (observed)",
                                summarize(masks, {n: "mlp_down" for n in downs}), topk_density=d))
    for path in args.adapters:
        meta = read_adapters(path)[1]
        relu, rplan = rebuild(copy.deepcopy(model), path)
        masks = record_masks(relu, rplan, ids, args.new_tokens)
        rows.append(variant_row(f"relufied {meta.get('variant')} + LoRA ({Path(path).name})",
                                summarize(masks, {n: "mlp_down" for n in downs} | rplan.roles),
                                adapters=Path(path).name, relufy_variant=meta.get("variant")))
        del relu
    return {**common, "cpu": platform.processor() or platform.machine(), "loadavg": os.getloadavg(),
            "rows": rows}


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
