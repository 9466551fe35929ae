"""Does rotating the activations (LaRoSA) make top-k sparsity lose less than our best plans?

For each shared linear input, Q = eigenvectors of the calibration second moment; the linear
reads ``(x Q)_topk (W Q)^T`` with a fixed k per token (``eval.rotated``, hooks). Compared at
the same sparsity of every masked linear input, in the same run and through the same kind of
evaluation (eager hooks, ``eval.masked`` for the plans):

* ``topk``: the same fixed-k top-k without rotation (the rotation's own effect);
* ``larosa-residual``: rotations on q/k/v and gate/up inputs only (plain top-k on o and down);
* ``larosa``: rotations on every masked input;
* ``teal-greedy`` and ``stat-topk`` plans calibrated as ``benchmarks.accuracy`` does.

Calibration: WikiText-2 test articles 0-9 (``--calib-tokens`` for the plans, ``--rotation-tokens``
for the second moments); perplexity: articles 10+ and LAMBADA contexts.

    python benchmarks/studies/larosa.py --out benchmarks/results/larosa_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.harness import log, write_json  # noqa: E402


def markdown(data: dict) -> str:
    """The study's table: perplexity on both texts and the increase over dense, per target."""
    cfg, rows = data["config"], data["rows"]
    dense = next(r for r in rows if r["variant"] == "dense")
    lines = [f"# Rotated activations (LaRoSA-style) on {cfg['model']}", "", f"Command: `{cfg['command']}`", "",
             f"Calibration: {cfg['calibration_text']} ({cfg['calib_tokens']} tokens for the plans, "
             f"{data.get('rotation_tokens_used', cfg['rotation_tokens'])} for the rotations); perplexity: "
             f"{cfg['evaluation_text']} and {cfg['second_text']}, first {cfg['eval_tokens']} tokens of each in "
             f"windows of {cfg['window']}; {cfg['evaluation']}; {cfg['sparsity']}.", "",
             "| variant | target | ppl wikitext2 | increase | ppl lambada | increase |", "|---|---|---|---|---|---|",
             f"| dense | | {dense['ppl_wikitext2']:.2f} | | {dense['ppl_lambada']:.2f} | |"]
    for r in sorted((r for r in rows if r["variant"] != "dense"), key=lambda r: (r["target"], r["variant"])):
        lines.append(f"| {r['variant']} | {r['target']:.2f} | {r['ppl_wikitext2']:.2f} | "
                     f"{r['ppl_wikitext2'] - dense['ppl_wikitext2']:+.2f} | {r['ppl_lambada']:.2f} | "
                     f"{r['ppl_lambada'] - dense['ppl_lambada']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--targets", nargs="+", type=float, default=[0.4, 0.5])
    p.add_argument("--variants", nargs="+", default=["topk", "larosa-residual", "larosa", "teal-greedy", "stat-topk"],
                   choices=["topk", "larosa-residual", "larosa", "teal-greedy", "stat-topk"])
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--rotation-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--second-docs", type=int, default=300)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--render", action="store_true", help="only write the markdown table of --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        import json

        Path(args.out).with_suffix(".md").write_text(markdown(json.loads(Path(args.out).read_text())))
        return 0

    from actsparse.calibration import Calibrator, greedy_for, wikitext2_split
    from actsparse.calibration.data import token_batches
    from actsparse.calibration.larosa import SCOPES, fit_rotations
    from actsparse.calibration.sites import trace_sites
    from actsparse.eval import perplexity
    from actsparse.eval.masked import masked
    from actsparse.eval.rotated import rotated_topk
    from actsparse.models import load
    from benchmarks.accuracy import second_text

    args.second_text = "lambada"
    model, tok = load(args.model)
    cal_text, eval_text, split = wikitext2_split(args.data)
    texts = {"wikitext2": eval_text, "lambada": second_text(args)}
    out = Path(args.out)
    data = {"config": {"command": "python benchmarks/studies/larosa.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "model": args.model, "calibration_text": split["calibration"],
                       "evaluation_text": split["evaluation"],
                       "second_text": f"LAMBADA test contexts, {args.second_docs} seeded, joined by blank lines",
                       "calib_tokens": args.calib_tokens, "rotation_tokens": args.rotation_tokens,
                       "eval_tokens": args.eval_tokens, "window": args.window, "dtype": "float32",
                       "evaluation": "eager hooks: eval.rotated.rotated_topk for top-k variants, "
                                     "eval.masked.masked for plans",
                       "sparsity": "target = sparsity of every masked linear input (q/k/v, o, gate/up, down)",
                       "torch": torch.__version__, "machine": platform.machine()},
            "rows": []}

    def ppl(fwd) -> dict:
        res = {}
        for name, text in texts.items():
            r = perplexity(fwd, tok, text=text, window=args.window, max_tokens=args.eval_tokens,
                           batch_size=args.batch_size, progress=False)
            res[name] = r.ppl
        return res

    def add(variant, target, res, t0, **extra):
        data["rows"].append({"variant": variant, "target": target, **{f"ppl_{k}": v for k, v in res.items()},
                             "seconds": round(time.perf_counter() - t0, 1), **extra})
        write_json(out, data)
        log(f"{variant} @ {target}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))

    t0 = time.perf_counter()
    add("dense", None, ppl(model), t0)
    sites = trace_sites(model)
    t0 = time.perf_counter()
    batches, info = token_batches(cal_text, tok, token_budget=args.rotation_tokens, batch_size=args.batch_size,
                                  seq_len=args.window, seed=args.seed)
    rotations = fit_rotations(model, sites, batches, "all")
    data["rotation_seconds"] = round(time.perf_counter() - t0, 1)
    data["rotation_tokens_used"] = info["tokens"]
    residual = {g: q for g, q in rotations.items() if next(s for s in sites if s.module == g).role in SCOPES["residual"]}
    plans = [v for v in args.variants if v in ("teal-greedy", "stat-topk")]
    cal = None
    if plans:
        t0 = time.perf_counter()
        cal = Calibrator(model, cal_text, tok, methods=plans, token_budget=args.calib_tokens,
                         batch_size=args.batch_size, seq_len=args.window, seed=args.seed, progress=False,
                         source=split["source"])
        if "teal-greedy" in plans:
            greedy_for(cal, max(args.targets))
        data["plan_calibration_seconds"] = round(time.perf_counter() - t0, 1)
    rot = {"topk": {}, "larosa-residual": residual, "larosa": rotations}
    for target in args.targets:
        for v in args.variants:
            t0 = time.perf_counter()
            if v in rot:
                with rotated_topk(model, sites, rot[v], target):
                    res = ppl(model)
                add(v, target, res, t0, rotated_groups=len(rot[v]))
            else:
                plan = cal.plan(v, target)
                with masked(model, plan):
                    res = ppl(model)
                add(v, target, res, t0, calibration_sparsity=plan.overall_sparsity)
    out.with_suffix(".md").write_text(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
