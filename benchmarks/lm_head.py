"""Accuracy cost of optional LM-head sparsity: perplexity with and without a head threshold (CPU).

    python -m benchmarks.lm_head --out benchmarks/results/lm_head_smollm2-135m.json

For one model, one TEAL plan of the decoder linears at each ``--targets`` value, then the same
plan with the head's input masked at each ``--head`` sparsity (``calibrate(...,
lm_head_sparsity=...)``). Calibration on WikiText-2 test articles 0-9, perplexity on the
articles after them, through the masked eager model (``actsparse.eval.masked``: the reference
the compiled backend matches). Also the head's share of the weight bytes a token reads, which
is what its sparsity can save.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.harness import command_line, log, result, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_head", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--targets", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--head", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--data", default=None, help="data folder (default: ACTSPARSE_DATA)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from actsparse import SparsityPlan, models
    from actsparse.calibration import Calibrator, wikitext2_split
    from actsparse.calibration.lm_head import add_lm_head_sparsity, head_name
    from actsparse.eval.masked import masked
    from actsparse.eval.perplexity import perplexity
    from benchmarks.decode import weight_bytes

    t0 = time.time()
    model, tok = models.load(a.model)
    cal_text, eval_text, split = wikitext2_split(a.data, 10)
    head = model.get_submodule(head_name(model))
    res = result(command_line("benchmarks.lm_head", argv), [], model=a.model, split=split,
                 head_weight_share=head.weight.numel() * head.weight.element_size() / weight_bytes(model),
                 note="GPU-free: perplexity only; 'gpu' is none")

    def ppl(plan) -> float:
        with masked(model, plan):
            return float(perplexity(model, tok, eval_text, window=a.window, max_tokens=a.eval_tokens,
                                    progress=False).ppl)

    cal = Calibrator(model, cal_text, tok, methods=["teal"], token_budget=a.calib_tokens, seq_len=a.window,
                     progress=False, source=split["source"])
    for target in a.targets:
        base = cal.plan("teal", target) if target > 0 else SparsityPlan(method="dense", target=0.0)
        dense_head = ppl(base)
        res["rows"].append(dict(variant=f"teal-{target:g}", sparsity=target, head_sparsity=0.0, ppl=dense_head))
        log(f"teal {target:g}, head dense: ppl {dense_head:.3f}")
        for hs in a.head:
            plan = SparsityPlan.from_dict(base.to_dict(), base.tensors())
            add_lm_head_sparsity(plan, model, cal_text, hs, tok, token_budget=a.calib_tokens, seq_len=a.window)
            value = ppl(plan)
            res["rows"].append(dict(variant=f"teal-{target:g}+head-{hs:g}", sparsity=target, head_sparsity=hs,
                                    head_measured=plan.measured[head_name(model)], ppl=value,
                                    ppl_increase=value - dense_head))
            log(f"teal {target:g}, head {hs:g}: ppl {value:.3f} ({value - dense_head:+.3f})")
            write_json(a.out, res)
    res["wall_s"] = time.time() - t0
    write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
