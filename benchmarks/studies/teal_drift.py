"""Where does a TEAL plan's extra sparsity come from: another text, or its own masks?

TEAL thresholds are |x| quantiles of the dense model's inputs. Run sparse, each block sees the
inputs that earlier masks changed, so the fraction under a threshold can move even on the
calibration text itself. This measures the masked fraction per role and block with the plan
applied (eager hooks), on the calibration text and on held-out WikiText-2, and the same
thresholds on the dense model's inputs (nothing masked: the calibration's own estimate).

    python benchmarks/studies/teal_drift.py --out benchmarks/results/teal_drift_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.harness import log, write_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="teal")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--data", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from actsparse.calibration import Calibrator, wikitext2_split
    from actsparse.calibration.data import token_batches
    from actsparse.calibration.sites import masked_sites
    from actsparse.eval.masked import masked
    from actsparse.models import load

    model, tok = load(args.model)
    cal_text, eval_text, split = wikitext2_split(args.data)
    cal = Calibrator(model, cal_text, tok, methods=[args.method], token_budget=args.calib_tokens, progress=False,
                     source=split["source"])
    plan = cal.plan(args.method, args.target)
    sites = {s.module: s for s in masked_sites(cal.sites)}
    mods = dict(model.named_modules())
    res = {"config": {"command": "python benchmarks/studies/teal_drift.py " + " ".join(sys.argv[1:]),
                      "model": args.model, "method": args.method, "target": args.target,
                      "calib_tokens": args.calib_tokens, "tokens": args.tokens,
                      "measure": "fraction of each thresholded input with |x| <= t, parameter-weighted"}, "rows": []}
    for text_name, text in (("calibration", cal_text), ("heldout", eval_text)):
        batches, _ = token_batches(text, tok, token_budget=args.tokens, batch_size=4, seq_len=512, seed=0)
        for mode in ("dense", "sparse"):
            acc: dict[str, list[float]] = {}

            def hook(name, t):
                def fn(mod, a):
                    x = a[0].detach().float()
                    acc.setdefault(name, [0.0, 0.0])
                    acc[name][0] += float((x.abs() <= t).float().sum())
                    acc[name][1] += x.numel()
                return fn

            hs = [mods[n].register_forward_pre_hook(hook(n, t)) for n, t in plan.thresholds.items()]
            ctx = masked(model, plan) if mode == "sparse" else torch.no_grad()
            with torch.no_grad(), ctx:  # the observing hooks run first: they see the unmasked input
                for ids in batches:
                    model(input_ids=ids, use_cache=False)
            for h in hs:
                h.remove()
            frac = {n: z / c for n, (z, c) in acc.items()}
            tot = sum(sites[n].params for n in frac)
            by_role: dict[str, list[float]] = {}
            for n, f in frac.items():
                by_role.setdefault(sites[n].role, [0.0, 0.0])
                by_role[sites[n].role][0] += f * sites[n].params
                by_role[sites[n].role][1] += sites[n].params
            blocks = sorted({sites[n].block for n in frac})
            per_block = {b: sum(frac[n] * sites[n].params for n in frac if sites[n].block == b)
                         / sum(sites[n].params for n in frac if sites[n].block == b) for b in blocks}
            row = {"text": text_name, "mode": mode,
                   "sparsity": round(sum(f * sites[n].params for n, f in frac.items()) / tot, 4),
                   "by_role": {r: round(a / b, 4) for r, (a, b) in by_role.items()},
                   "by_block": {str(b): round(v, 4) for b, v in per_block.items()}}
            res["rows"].append(row)
            write_json(args.out, res)
            log(f"{text_name} {mode}: {row['sparsity']:.4f} {row['by_role']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
