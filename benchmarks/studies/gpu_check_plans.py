"""GPU check: every plan kind compiled with CUDA graphs equals the eager masked model.

A Llama of 8B widths and 2 layers in bf16 on the GPU; plans calibrated on random tokens
(teal, teal with WINA scores, CATS, statistical top-k) and random head routers at density 0.5
(alone and with teal); prefill then decode steps at batch 1
and 4 through ``torch.compile(backend=actsparse.backend(plan, cudagraphs=True))``, compared
with the eager model whose linears are masked by hooks. Writes a JSON summary.

    python -m benchmarks.studies.gpu_check_plans --out $OUT/gpu_check_plans.json
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import sys

import torch
from transformers import StaticCache

import actsparse
from actsparse.calibration.heads import random_head_routing
from actsparse.eval.masked import masked
from actsparse.models import shaped


def run(fwd, model, ids, plan=None, steps=5):
    """Prefill eagerly (masked by hooks when ``plan`` is given), then ``steps`` decode steps
    through ``fwd``; the last-position logits of each step.

    The prefill is not compiled: with torch 2.11 and transformers 5.17, a compiled prefill
    followed by compiled decode steps on a fresh static cache crashes inside CUDA-graph
    trees even for dense ``backend="inductor"``; decoding, which the speed figures time, is
    unaffected (a gpt-fast style loop, as in ``benchmarks.e2e``).
    """
    b, n = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 2)
    outs = []
    with masked(model, plan) if plan is not None else contextlib.nullcontext(), torch.no_grad():
        out = model(input_ids=ids[:, :n - steps], past_key_values=cache,
                    cache_position=torch.arange(n - steps, device=ids.device))
    outs.append(out.logits[:, -1].float().clone())
    with torch.no_grad():
        for i in range(n - steps, n):
            out = fwd(input_ids=ids[:, i:i + 1], past_key_values=cache,
                      cache_position=torch.tensor([i], device=ids.device))
            if ids.is_cuda:
                torch.cuda.synchronize()
            outs.append(out.logits[:, -1].float().clone())
    return outs


def _with_heads(plan, model):
    plan.add(random_head_routing(model, 0.5).rule(actsparse.plan.HeadRouting))
    return plan


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--dry-run", action="store_true", help="a tiny fp32 llama on the CPU, no CUDA graphs")
    p.add_argument("--no-cudagraphs", action="store_true")
    p.add_argument("--plans", nargs="+", default=["teal", "teal+wina", "cats", "stat-topk", "heads", "teal+heads"])
    args = p.parse_args()
    faulthandler.enable()
    if args.dry_run:
        from actsparse.models import tiny
        model, dev = tiny("llama"), "cpu"
    else:
        model, dev = shaped("llama3-tiny", dtype=torch.bfloat16, device="cuda"), "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (2048,), device=dev, generator=g)
    print("calibrating", flush=True)
    all_plans = {
        "teal": lambda: actsparse.calibrate(model, calib.cpu(), "teal", 0.5, token_budget=2048, seq_len=256, progress=False),
        "teal+wina": lambda: actsparse.calibrate(model, calib.cpu(), "teal", 0.5, token_budget=2048, seq_len=256,
                                         progress=False, wina=True),
        "cats": lambda: actsparse.calibrate(model, calib.cpu(), "cats", 0.5, token_budget=2048, seq_len=256, progress=False),
        "stat-topk": lambda: actsparse.SparsityPlan.statistical(0.5, model),
        "heads": lambda: random_head_routing(model, 0.5),
        "teal+heads": lambda: _with_heads(all_plans["teal"](), model),
    }
    plans = {k: all_plans[k]() for k in args.plans}
    results = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
               "command": "python -m benchmarks.studies.gpu_check_plans " + " ".join(sys.argv[1:]), "rows": []}
    ok_all = True
    for name, plan in plans.items():
        for batch in (1, 4):
            ids = torch.randint(0, model.config.vocab_size, (batch, 24), device=dev, generator=g)
            print(f"{name} batch {batch}: reference", flush=True)
            with masked(model, plan):
                ref = run(model.forward, model, ids)
            dense = run(model.forward, model, ids, plan)
            print(f"{name} batch {batch}: compiled", flush=True)
            actsparse.prepare(model, plan)
            torch._dynamo.reset()
            be = actsparse.backend(plan, cudagraphs=not (args.dry_run or args.no_cudagraphs))
            got = run(torch.compile(model.forward, backend=be, fullgraph=True), model, ids, plan)
            errs = [((a - r).norm() / r.norm()).item() for a, r in zip(got, ref)]
            gaps = [((d - r).norm() / r.norm()).item() for d, r in zip(dense, ref)]
            err, gap = max(errs), max(gaps)
            ok = err < 0.5 * gap and be.masked_sites > 0
            ok_all &= ok
            row = {"plan": name, "variant": name, "batch": batch, "rel_err_vs_masked_eager": err,
                   "rel_diff_dense_vs_masked": gap, "per_step_err": errs, "per_step_dense_diff": gaps, "masked_sites": be.masked_sites, "ok": ok}
            results["rows"].append(row)
            print(row, flush=True)
    results["ok"] = ok_all
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
