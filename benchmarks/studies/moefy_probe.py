"""Exploratory: where dense-to-MoE loses perplexity on a real model, at one density.

Compares, at the same fraction of experts: the learned router (dynamic-k), an oracle that
runs each token's top experts by their true output norm (what a perfect router could do with
these experts), for a few expert counts and both clustering features. Short evaluation
(``--eval-tokens``) on WikiText-2 articles 10+; calibration on articles 0-9.

    OMP_NUM_THREADS=2 python -m benchmarks.studies.moefy_probe --experts 32 128 --density 0.667
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import torch

from benchmarks.moefy import oracle


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, nargs="+", default=[32, 128])
    p.add_argument("--features", nargs="+", default=["coact", "down"])
    p.add_argument("--router", default="linear")
    p.add_argument("--density", type=float, default=0.667)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--adapters", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import actsparse
    from actsparse.calibration import wikitext2_split
    from actsparse.eval import perplexity
    from actsparse.models import load
    from actsparse.train import rebuild
    from actsparse.train.moefy import routed

    base, tok = load("smollm2-135m", dtype=torch.float32)
    if args.adapters:
        base, _ = rebuild(base, args.adapters)
    calib, text, _ = wikitext2_split()

    def ppl(m):
        return round(perplexity(m, tok, text=text, window=512, max_tokens=args.eval_tokens, batch_size=2,
                                progress=False).ppl, 3)

    rows = [{"variant": "dense", "ppl": ppl(base)}]
    print(rows[-1], file=sys.stderr)
    for e in args.experts:
        for f in args.features:
            model, plan = actsparse.moefy(copy.deepcopy(base), experts=e, density=args.density, calibration=calib,
                                          tokenizer=tok, features=f, router=args.router,
                                          token_budget=args.calib_tokens)
            with routed(model, plan):
                r = ppl(model)
            with oracle(model, plan, args.density):
                o = ppl(model)
            rows.append({"experts": e, "features": f, "router": args.router, "density": args.density,
                         "ppl_router": r, "ppl_oracle_topk": o})
            print(rows[-1], file=sys.stderr)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"command": "python -m benchmarks.studies.moefy_probe " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
