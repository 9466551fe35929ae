"""`actsparse train --recipe relufy` (the default): relufy a model and fine-tune LoRA adapters
on it by self-distillation.

Writes the adapters (``--out``, safetensors, with how to rebuild in the header), the relufied
model's exact plan next to them (``<out>.plan.json``) and, with ``--json``, a summary (losses,
training tokens, seconds, MLP sparsity on held-out teacher samples).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from .command_common import fail, load_model, mean
from .distill import DistillConfig
from .lora import ALL_TARGETS
from .relufy import VARIANTS

NAME = "relufy"
OWN = ("variant", "shift", "shift_sparsity", "l1")  # options only this recipe takes
_D = DistillConfig()
DEFAULTS = {"variant": "relu", "shift": 0.0, "l1": _D.l1, "steps": _D.steps, "targets": ",".join(ALL_TARGETS)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("--recipe relufy").add_argument
    add("--variant", default=None, help=f"relufy variant: {', '.join(VARIANTS)} (default: relu)")
    add("--shift", type=float, default=None, help="shifted-relu: the shift of every MLP (default: 0)")
    add("--shift-sparsity", type=float, default=None, metavar="S",
        help="shifted-relu: calibrate each MLP's shift to this sparsity on teacher samples")
    add("--l1", type=float, default=None, help=f"weight of the L1 sparsity term (default: {_D.l1})")


def _config(args: argparse.Namespace) -> DistillConfig:
    targets = tuple(t.strip() for t in str(args.targets).split(",") if t.strip())
    return DistillConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, samples=args.samples,
                         lr=args.lr, rank=args.rank, alpha=args.alpha, targets=targets, l1=args.l1,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                         max_seconds=60.0 * args.max_minutes).check()


def run(args: argparse.Namespace) -> int:
    if args.variant not in VARIANTS:
        return fail(f"unknown --variant {args.variant!r}; choose one of {', '.join(VARIANTS)}")
    try:
        cfg = _config(args)
    except ValueError as e:
        return fail(e)

    from .distill import distill, held_out_kl, sample_sequences
    from .lora import save_adapters
    from .relufy import mlp_sparsity, relufy

    teacher, err = load_model(args.model, args.dtype, args.device)
    if err:
        return fail(err)
    t0 = time.perf_counter()
    seqs = sample_sequences(teacher, cfg.samples + args.held_out, cfg.seq_len, seed=cfg.seed,
                            temperature=cfg.temperature, top_k=cfg.top_k)
    train, held = seqs[:cfg.samples], seqs[cfg.samples:]
    sample_s = time.perf_counter() - t0
    kw = {}
    if args.variant == "shifted-relu":
        kw = {"tokens": train[:8], "sparsity": args.shift_sparsity} if args.shift_sparsity is not None \
            else {"shift": args.shift}
    try:
        student, plan = relufy(copy.deepcopy(teacher), args.variant, **kw)
    except ValueError as e:
        return fail(e)
    before = {"kl": held_out_kl(student, teacher, held), "mlp_sparsity": mean(mlp_sparsity(student, held))}
    res = distill(student, teacher, cfg, sequences=train, progress=args.progress)
    after_sp = mlp_sparsity(student, held)
    after = {"kl": held_out_kl(student, teacher, held), "mlp_sparsity": mean(after_sp)}
    save_adapters(student, args.out, info=plan.info)
    plan.measured = after_sp
    plan_path = plan.save(str(args.out) + ".plan.json")
    summary = {"model": args.model, "recipe": NAME, "variant": args.variant, "config": res.config,
               "tokens": res.tokens, "train_seconds": round(res.seconds, 1), "sample_seconds": round(sample_s, 1),
               "before": before, "after": after, "kl_per_step": res.kl, "adapters": str(args.out),
               "plan": str(plan_path), "device": str(args.device)}
    print(f"KL {before['kl']:.4f} -> {after['kl']:.4f}; MLP sparsity {before['mlp_sparsity']:.3f} -> "
          f"{after['mlp_sparsity']:.3f}; {res.tokens} tokens in {res.seconds:.0f}s; adapters {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0
