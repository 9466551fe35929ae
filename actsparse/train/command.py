"""`actsparse train`: relufy a model and fine-tune it by self-distillation; argument
definitions and the command. The CLI module only wires these in.

Writes the LoRA adapters (safetensors, with how to rebuild in the header), the relufied
model's exact plan next to them (``<out>.plan.json``) and, with ``--json``, a summary (losses,
training tokens, seconds, MLP sparsity on held-out teacher samples). ``--model tiny:<arch>``
trains a seeded random tiny model (tests, smoke runs). User errors print one line to stderr
and return 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from .distill import DistillConfig
from .lora import ALL_TARGETS
from .relufy import VARIANTS


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    d = DistillConfig()
    add("--model", default="smollm2-135m", help="actsparse.models.load name, or tiny:<arch> (default: %(default)s)")
    add("--variant", default="relu", help=f"relufy variant: {', '.join(VARIANTS)} (default: %(default)s)")
    add("--shift", type=float, default=0.0, help="shifted-relu: the shift of every MLP (default: %(default)s)")
    add("--shift-sparsity", type=float, default=None, metavar="S",
        help="shifted-relu: calibrate each MLP's shift to this sparsity on teacher samples")
    add("--out", required=True, metavar="PATH", help="adapter file to write (.safetensors)")
    add("--json", default=None, metavar="PATH", help="write a summary of the run as JSON here")
    add("--steps", type=int, default=d.steps)
    add("--batch-size", type=int, default=d.batch_size)
    add("--seq-len", type=int, default=d.seq_len)
    add("--samples", type=int, default=d.samples, help="teacher-sampled training sequences (default: %(default)s)")
    add("--held-out", type=int, default=8, help="further teacher samples to measure KL and sparsity on")
    add("--lr", type=float, default=d.lr)
    add("--rank", type=int, default=d.rank)
    add("--alpha", type=float, default=d.alpha)
    add("--targets", default=",".join(ALL_TARGETS), help="linears that get adapters (default: %(default)s)")
    add("--l1", type=float, default=d.l1, help="weight of the L1 sparsity term (default: %(default)s)")
    add("--temperature", type=float, default=d.temperature)
    add("--top-k", type=int, default=d.top_k)
    add("--seed", type=int, default=d.seed)
    add("--dtype", default="float32", help="float32 or bfloat16 (default: %(default)s)")
    add("--device", default="cpu")
    add("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def _config(args: argparse.Namespace) -> DistillConfig:
    targets = tuple(t.strip() for t in str(args.targets).split(",") if t.strip())
    return DistillConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, samples=args.samples,
                         lr=args.lr, rank=args.rank, alpha=args.alpha, targets=targets, l1=args.l1,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed).check()


def _load(name: str, dtype, device):
    from .. import models

    if name.startswith("tiny:"):
        return models.tiny(name.split(":", 1)[1], dtype=dtype).to(device)
    model, _ = models.load(name, dtype=dtype, device=device)
    return model


def run_train_command(args: argparse.Namespace) -> int:
    def fail(msg) -> int:
        print(f"actsparse train: error: {msg}", file=sys.stderr)
        return 2

    if args.variant not in VARIANTS:
        return fail(f"unknown --variant {args.variant!r}; choose one of {', '.join(VARIANTS)}")
    if args.dtype not in ("float32", "bfloat16"):
        return fail(f"--dtype must be float32 or bfloat16, got {args.dtype!r}")
    if args.held_out < 1:
        return fail(f"--held-out must be >= 1, got {args.held_out}")
    try:
        cfg = _config(args)
    except ValueError as e:
        return fail(e)
    if not Path(args.out).parent.is_dir():
        return fail(f"directory of --out does not exist: {Path(args.out).parent}")

    import torch

    from .. import models
    from .distill import distill, held_out_kl, sample_sequences
    from .lora import save_adapters
    from .relufy import mlp_sparsity, relufy

    try:
        teacher = _load(args.model, getattr(torch, args.dtype), args.device)
    except (ValueError, KeyError, FileNotFoundError, models.ModelNotInstalledError) as e:
        return fail(f"cannot load model {args.model!r}: {e}")
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
    before = {"kl": held_out_kl(student, teacher, held), "mlp_sparsity": _mean(mlp_sparsity(student, held))}
    res = distill(student, teacher, cfg, sequences=train, progress=args.progress)
    after_sp = mlp_sparsity(student, held)
    after = {"kl": held_out_kl(student, teacher, held), "mlp_sparsity": _mean(after_sp)}
    save_adapters(student, args.out, info=plan.info)
    plan.measured = after_sp
    plan_path = plan.save(str(args.out) + ".plan.json")
    summary = {"model": args.model, "variant": args.variant, "config": res.config, "tokens": res.tokens,
               "train_seconds": round(res.seconds, 1), "sample_seconds": round(sample_s, 1),
               "before": before, "after": after, "kl_per_step": res.kl, "adapters": str(args.out),
               "plan": str(plan_path), "device": str(args.device)}
    print(f"KL {before['kl']:.4f} -> {after['kl']:.4f}; MLP sparsity {before['mlp_sparsity']:.3f} -> "
          f"{after['mlp_sparsity']:.3f}; {res.tokens} tokens in {res.seconds:.0f}s; adapters {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def _mean(d: dict) -> float:
    return sum(d.values()) / max(len(d), 1)
