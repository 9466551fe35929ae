"""Accuracy of sparsity on quantized weights: one fp32 plan applied to int8 and int4 models.

    python -m benchmarks.accuracy_quant --models smollm2-135m gemma3-270m \
        --out benchmarks/results/accuracy_quant.json

Same protocol as ``benchmarks.accuracy`` (its helpers are reused): calibration on WikiText-2
test articles 0-9, perplexity on articles 10+, evaluation through the sparse backend with
``compiler="eager"``, effective sparsity observed from the masks the graph applies. The
teal-greedy plans are calibrated ONCE on the fp32 model and applied unchanged to its
``actsparse.quantize`` copies (int8; int4 at ``--group-size``), which is what the plan
fingerprint allows. The check answers the project's target: quantization adds no more to the
sparse model's perplexity than it adds to the dense one (``increase[s] <= increase[0]``).
``--plan-on self`` calibrates each format's plan on its own model instead (sparse rows only),
which separates the plan transfer's share of the cost from quantization's own. ``--rounding
gptq`` (or ``gptq-act``, act order) quantizes with GPTQ on the calibration text; ``gptq-plan``
(``gptq-act-plan``) does so once per sparse row, on the inputs that row's plan leaves
(``actsparse.quantize(..., plan=)``), so those weights are fitted to the sparse model they run
in. ``--gptq-tokens`` gives GPTQ more calibration tokens than the plans' ``--calib-tokens``
(the same text's first N). ``--tasks`` adds zero-shot tasks to every row. With several
models and ``--jobs`` > 1 each model runs in its own process and the parent merges.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.accuracy import TASKS, MaskObserver, ObservingBackend, _evaluate, _model_out, _plan_summary, _strip
from benchmarks.harness import log, write_json

TARGETS = (0.4, 0.5)
METHOD = "teal-greedy"


class QuantObservingBackend(ObservingBackend):
    """``ObservingBackend`` that also observes the quantized sparse op and masked quantized linears."""

    def __call__(self, gm, example_inputs):
        run = super().__call__(gm, example_inputs)
        from actsparse.ops.dense import masked_input

        qsparse = torch.ops.actsparse.quant_sparse_linear.default
        qdense = torch.ops.actsparse.quant_linear.default
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is qsparse:  # (x, qweight, scales, offsets, bias, t, per_token, bits, ...)
                a = node.args
                with gm.graph.inserting_before(node):
                    gm.graph.call_function(self.observer.quant, (a[0], a[1], a[7], a[5], a[6]))
            elif node.target is masked_input:
                for u in node.users:
                    if u.op == "call_function" and u.target is qdense and u.args[0] is node:
                        per_token = node.args[2] if len(node.args) > 2 else node.kwargs.get("per_token", False)
                        with gm.graph.inserting_before(node):
                            gm.graph.call_function(self.observer.quant, (node.args[0], u.args[1], u.args[5],
                                                                          node.args[1], per_token))
        gm.recompile()
        return run


class QuantMaskObserver(MaskObserver):
    """``MaskObserver`` that also counts quantized weights, at their logical [N, K] size."""

    def quant(self, x, qweight, bits, threshold, per_token) -> None:
        if not self.active:
            return
        from actsparse.ops.reference import input_mask

        k, n = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
        mask = input_mask(x.detach().reshape(-1, x.shape[-1]), threshold, per_token)
        acc = self.sums.setdefault((qweight.data_ptr(), (n, k)), [0.0, 0.0, float(n * k)])
        acc[0] += float((~mask).float().mean(dim=1).sum())
        acc[1] += mask.shape[0]


#: ``--int4-clip`` choices: label suffix and ``actsparse.quantize`` options ("mse-act" adds the
#: calibration tokens, which weight each input channel's error by its activations).
INT4_CLIPS = {"minmax": ("", {}), "mse": ("-mse", {"clip": "mse"}), "mse-act": ("-mseact", {"clip": "mse"})}


#: ``--rounding`` choices: label suffix. "...-plan" quantizes once per sparse row, with GPTQ's
#: Hessians taken under that row's plan (its dense row is GPTQ without a plan); "gptq-act" is
#: GPTQ's act order (``actsparse.quantize(rounding="gptq-act")``).
ROUNDINGS = {"nearest": "", "gptq": "-gptq", "gptq-plan": "-gptqplan", "gptq-act": "-gptqact",
             "gptq-act-plan": "-gptqactplan"}


def variants(group_size: int, int4_clip: str = "minmax", rounding: str = "nearest") -> list[tuple[str, int | None, int | None]]:
    """(label, bits, group_size) of each weight format evaluated."""
    r = ROUNDINGS[rounding]
    return [("fp32", None, None), (f"int8{r}", 8, None),
            (f"int4-g{group_size}{INT4_CLIPS[int4_clip][0]}{r}", 4, group_size)]


def quantize_options(bits: int, int4_clip: str, rounding: str, tokens) -> dict:
    """``actsparse.quantize`` keyword options of one format (without the plan of "gptq-plan")."""
    opts = dict(INT4_CLIPS[int4_clip][1]) if bits == 4 else {}
    if rounding != "nearest":
        opts.update(rounding=rounding.removesuffix("-plan"), tokens=tokens)
    elif bits == 4 and int4_clip == "mse-act":
        opts["tokens"] = tokens
    return opts


def run_model(name: str, args, out: Path) -> dict:
    """Every (format, sparsity) row of one model; the file is written after each row."""
    import actsparse
    from actsparse import models
    from actsparse.calibration import Calibrator, greedy_for, wikitext2_split
    from actsparse.calibration.sites import masked_sites

    data = json.loads(out.read_text()) if args.resume and out.exists() else {}
    rows = data.setdefault("rows", [])
    done = {(r["format"], r["target"]) for r in rows}
    base, tok = models.load(name)
    cal_text, eval_text, split = wikitext2_split(args.data, args.calibration_articles)
    data.update({"model": name, "config": _config(args, split)})

    def calibrate(model, label):
        t0 = time.perf_counter()
        cal = Calibrator(model, cal_text, tok, methods=[METHOD], token_budget=args.calib_tokens,
                         batch_size=args.batch_size, seq_len=args.window, seed=args.seed, progress=False,
                         source=split["source"], greedy_step=args.greedy_step, greedy_tokens=args.greedy_tokens)
        greedy_for(cal, max(args.targets))
        data.setdefault("calibration_seconds", {})[label] = round(time.perf_counter() - t0, 1)
        log(f"{name}: calibrated on {label} in {data['calibration_seconds'][label]} s")
        return {t: cal.plan(METHOD, t) for t in args.targets}, sum(s.params for s in masked_sites(cal.sites))

    formats = [v for v in variants(args.group_size, args.int4_clip, args.rounding)
               if v[0].split("-")[0] in args.formats]
    # the calibration text, as the plans use it (its first --gptq-tokens for GPTQ's Hessians)
    ids = tok(cal_text, return_tensors="pt").input_ids[:, : args.gptq_tokens or args.calib_tokens]
    if args.gptq_tokens and ids.shape[1] < args.gptq_tokens:
        raise SystemExit(f"--gptq-tokens {args.gptq_tokens}: the calibration text has only {ids.shape[1]} tokens")
    ids = ids[:, : ids.shape[1] // args.window * args.window].reshape(-1, args.window)
    if args.rounding.endswith("-plan") and args.plan_on != "fp32":
        raise SystemExit(f"--rounding {args.rounding} takes the fp32 plans (--plan-on fp32)")
    plans, total = {}, None
    if args.plan_on == "fp32" and any((v[0], t) not in done for v in formats for t in args.targets):
        plans, total = calibrate(base, "fp32")
    for label, bits, gs in formats:
        opts = {} if bits is None else quantize_options(bits, args.int4_clip, args.rounding, ids)
        model = base if bits is None else actsparse.quantize(copy.deepcopy(base), bits=bits, group_size=gs, **opts)
        if args.plan_on == "self" and any((label, t) not in done for t in args.targets):
            plans, total = calibrate(model, label)
        for target in (None, *args.targets):
            if (label, target) in done or (target is None and args.plan_on == "self"):
                continue
            t0 = time.perf_counter()
            row = {"model": name, "format": label, "bits": bits or 32, "group_size": gs, "method": "dense",
                   "target": target}
            if target is None:
                row.update(_evaluate(model, tok, eval_text, args, list(args.tasks), None))
                row["effective_sparsity"] = 0.0
            else:
                plan, observer = plans[target], QuantMaskObserver(total)
                torch._dynamo.reset()
                target_model = model
                if bits is not None and args.rounding.endswith("-plan"):  # the weights fitted to this plan
                    target_model = actsparse.quantize(copy.deepcopy(base), bits=bits, group_size=gs, plan=plan, **opts)
                    row["quantized_under_plan"] = True
                fwd = torch.compile(target_model, backend=QuantObservingBackend(plan, observer))
                row.update({"method": METHOD, "overall_sparsity": plan.overall_sparsity,
                            "plan_info": _plan_summary(plan),
                            "plan_calibrated_on": "fp32" if args.plan_on == "fp32" else label,
                            **_evaluate(fwd, tok, eval_text, args, list(args.tasks), observer)})
                torch._dynamo.reset()
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            write_json(out, data)
            log(f"{name}: {label} @ {target}: ppl {row['ppl']:.3f}, effective sparsity "
                f"{row['effective_sparsity']:.3f}, {row['seconds']} s")
        if model is not base:
            del model
    return data


def check(rows: list[dict], targets) -> dict:
    """Perplexity increase of each quantized format over fp32 at each sparsity, and the target test."""
    ppl = {(r["format"], r["target"]): r["ppl"] for r in rows}
    out = {}
    for fmt in sorted({r["format"] for r in rows if r["format"] != "fp32"}):
        inc = {}
        for t in (None, *targets):
            if (fmt, t) in ppl and ("fp32", t) in ppl:
                inc["0" if t is None else f"{t:g}"] = round(ppl[(fmt, t)] - ppl[("fp32", t)], 3)
        rel = {k: round(ppl[(fmt, None if k == "0" else float(k))] / ppl[("fp32", None if k == "0" else float(k))]
                        - 1, 4) for k in inc}
        dense = inc.get("0")
        out[fmt] = {"ppl_increase_over_fp32": inc, "relative_increase_over_fp32": rel,
                    "met_absolute": None if dense is None else {k: v <= dense for k, v in inc.items() if k != "0"},
                    "met_relative": None if dense is None else
                    {k: v <= rel["0"] for k, v in rel.items() if k != "0"}}
    return out


def _config(args, split: dict) -> dict:
    return {"command": "python -m benchmarks.accuracy_quant " + " ".join(sys.argv[1:]),
            "calibration_text": split["calibration"], "evaluation_text": split["evaluation"],
            "calibration_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens, "window": args.window,
            "method": METHOD, "targets": list(args.targets), "greedy_step": args.greedy_step,
            "greedy_tokens": args.greedy_tokens, "int4_group_size": args.group_size, "int4_clip": args.int4_clip,
            "tasks": list(args.tasks), "task_examples": args.limit if args.tasks else None,
            "rounding": args.rounding, "gptq_tokens": args.gptq_tokens or args.calib_tokens,
            "plan": "calibrated once on the fp32 model, applied unchanged to the int8 and int4 copies"
                    if args.plan_on == "fp32" else "calibrated on each format's own model",
            "compiler": "actsparse backend, compiler='eager' (masked graph without Inductor)",
            "activations": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "effective_sparsity": "as benchmarks.accuracy: masks applied on the perplexity text, "
                                  "parameter-weighted over the maskable decoder linears",
            "target": "quantization adds no more than its dense cost: ppl(q, s) - ppl(fp32, s) <= "
                      "ppl(q, 0) - ppl(fp32, 0) (absolute) or the same on ratios (relative)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_quant", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    add("--targets", nargs="+", type=float, default=list(TARGETS))
    add("--formats", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
    add("--plan-on", choices=["fp32", "self"], default="fp32",
        help="fp32: one plan calibrated on the fp32 model for every format (default); self: each "
             "format's plan calibrated on that format's own model (sparse rows only), to tell the "
             "plan transfer's share of the cost from quantization's own")
    add("--group-size", type=int, default=64, help="int4 input channels per scale (default: %(default)s)")
    add("--int4-clip", choices=list(INT4_CLIPS), default="minmax",
        help="int4 ranges: each group's min..max, the least-squared-error range, or that error "
             "weighted by the calibration text's activations (actsparse.quantize's clip and tokens)")
    add("--rounding", choices=list(ROUNDINGS), default="nearest",
        help="int8 and int4 rounding: nearest, GPTQ on the calibration text's inputs (gptq, or "
             "gptq-act: act order), or either on the inputs each sparse row's plan leaves (-plan: one "
             "quantization per row; actsparse.quantize's rounding, tokens and plan)")
    add("--tasks", nargs="*", default=[], choices=list(TASKS),
        help="zero-shot tasks evaluated on every row too (benchmarks.accuracy's; default: none)")
    add("--limit", type=int, default=100, help="examples per task (default: %(default)s)")
    add("--eval-tokens", type=int, default=4096)
    add("--window", type=int, default=512)
    add("--calib-tokens", type=int, default=4096)
    add("--gptq-tokens", type=int, default=None,
        help="calibration tokens behind GPTQ's Hessians and the mse-act ranges (default: --calib-tokens)")
    add("--calibration-articles", type=int, default=10)
    add("--greedy-step", type=float, default=0.02)
    add("--greedy-tokens", type=int, default=256)
    add("--batch-size", type=int, default=4)
    add("--seed", type=int, default=0)
    add("--data", default=None, metavar="DIR", help="data directory (default: $ACTSPARSE_DATA)")
    add("--threads", type=int, default=1)
    add("--jobs", type=int, default=2, help="models evaluated in parallel processes")
    add("--resume", action="store_true", help="keep the rows already in the per-model files")
    add("--out", default="benchmarks/results/accuracy_quant.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(args.models) > 1 and args.jobs > 1:
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.accuracy_quant",
                                   *_strip(argv, "--models", "--out", "--jobs"), "--models", m, "--jobs", "1",
                                   "--out", str(_model_out(out, m))]) for m in args.models]
        if any(p.wait() for p in procs):
            log("a model process failed; merging what was written")
    elif len(args.models) == 1 and out.stem.endswith(args.models[0]):
        run_model(args.models[0], args, out)
        return 0  # a per-model process: the parent merges
    else:
        for m in args.models:
            run_model(m, args, _model_out(out, m))
    per = {m: json.loads(_model_out(out, m).read_text()) for m in args.models if _model_out(out, m).exists()}
    first = next(iter(per.values()), {})
    config = dict(first.get("config", {}), command="python -m benchmarks.accuracy_quant " + " ".join(argv))
    result = {"cpu": os.uname().machine, "command": config["command"], "config": config,
              "models": {m: d["rows"] for m, d in per.items()},
              "calibration_seconds": {m: d.get("calibration_seconds") for m, d in per.items()},
              "check": {m: check(d["rows"], args.targets) for m, d in per.items()}}
    write_json(out, result)
    log(f"wrote {out}: {json.dumps(result['check'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
