"""`actsparse train --recipe moe`: fine-tune a dense-to-MoE model (``actsparse.moefy``)
towards its dense teacher by self-distillation (``moe_finetune.finetune_moe``).

The conversion is a saved plan (``--plan``, as ``actsparse.moefy`` or ``benchmarks.moefy
--save-plan`` write it) or made here (``--experts N --density D``), calibrated on the same
teacher-sampled sequences the fine-tune trains on, so no corpus is needed. Writes the
fine-tuned plan (``--out``, JSON + safetensors sidecar with the routers) and, for ``lora`` and
``both``, the LoRA adapters beside it (``save_finetuned``); ``load_finetuned`` reads them back
onto a fresh copy of the dense model. With ``--json``, a summary (held-out KL before and
after, tokens, seconds, the fraction of experts run per MLP).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from .command_common import fail, load_model, mean
from .moe_finetune import MLP_TARGETS, RECIPES, MoeFinetuneConfig
from .moefy import FEATURES, ROUTERS

NAME = "moe"
OWN = ("plan", "experts", "density", "finetune", "router_lr", "tau", "sequences", "features", "router", "hidden",
       "calib_tokens", "save_plan")  # options only this recipe takes
CONVERSION = ("features", "router", "hidden", "calib_tokens", "save_plan")  # only with --experts
_D = MoeFinetuneConfig()
DEFAULTS = {"finetune": "router", "router_lr": _D.router_lr, "tau": _D.tau, "steps": _D.steps,
            "targets": ",".join(MLP_TARGETS)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("--recipe moe").add_argument
    add("--plan", default=None, metavar="PATH", help="a saved dense-to-MoE plan (JSON + safetensors sidecar)")
    add("--experts", type=int, default=None, metavar="N", help="convert here instead: N experts per MLP")
    add("--density", type=float, default=None, metavar="D",
        help="fraction of experts run per token (needed with --experts; with --plan, default: the plan's)")
    add("--finetune", default=None, help=f"what learns: {', '.join(RECIPES)} (default: router)")
    add("--router-lr", type=float, default=None, help=f"router step relative to its RMS (default: {_D.router_lr})")
    add("--tau", type=float, default=None, help=f"straight-through surrogate width (default: {_D.tau})")
    add("--sequences", default=None, metavar="PATH",
        help="teacher samples cache (safetensors): read when its shapes match, else sampled and written")
    add("--features", default=None, help=f"conversion clustering features: {', '.join(FEATURES)} (default: coact)")
    add("--router", default=None, help=f"conversion router: {', '.join(ROUTERS)} (default: linear)")
    add("--hidden", type=int, default=None, help="conversion: hidden width of an mlp router (default: 64)")
    add("--calib-tokens", type=int, default=None, help="conversion: calibration tokens (default: 4096)")
    add("--save-plan", default=None, metavar="PATH", help="conversion: also save the plan before fine-tuning")


def _config(args: argparse.Namespace) -> MoeFinetuneConfig:
    targets = tuple(t.strip() for t in str(args.targets).split(",") if t.strip())
    return MoeFinetuneConfig(train=args.finetune, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             samples=args.samples, held_out=args.held_out, density=args.density,
                             router_lr=args.router_lr, lr=args.lr, rank=args.rank, alpha=args.alpha, targets=targets,
                             tau=args.tau, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                             max_seconds=60.0 * args.max_minutes).check()


def _check(args: argparse.Namespace) -> str | None:
    """The first problem with the moe options, before any model is loaded, or None."""
    if args.plan is not None and args.experts is not None:
        return "give --plan or --experts, not both (a plan fixes its experts)"
    if args.plan is None and args.experts is None:
        return "--recipe moe needs --plan PATH (a saved conversion) or --experts N --density D (convert here)"
    if args.plan is not None:
        given = [f"--{k.replace('_', '-')}" for k in CONVERSION if getattr(args, k) is not None]
        if given:
            return f"{given[0]} is a conversion option: it needs --experts, not --plan"
        if not Path(args.plan).is_file():
            return f"--plan {args.plan}: no such file"
    else:
        if args.experts < 1:
            return f"--experts must be >= 1, got {args.experts}"
        if args.density is None:
            return "--experts needs --density D (the fraction of experts run per token)"
        if args.features not in (None, *FEATURES):
            return f"unknown --features {args.features!r}; choose one of {', '.join(FEATURES)}"
        if args.router not in (None, *ROUTERS):
            return f"unknown --router {args.router!r}; choose one of {', '.join(ROUTERS)}"
        if args.hidden is not None and args.hidden < 1:
            return f"--hidden must be >= 1, got {args.hidden}"
        if args.calib_tokens is not None and args.calib_tokens < 16:
            return f"--calib-tokens must be >= 16, got {args.calib_tokens}"
    if args.finetune not in RECIPES:
        return f"unknown --finetune {args.finetune!r}; choose one of {', '.join(RECIPES)}"
    return None


def _student(teacher, args, train):
    """(moefied copy of the teacher, its plan, seconds): the saved ``--plan`` applied
    (``load_finetuned``: permutation, and adapters merged if the plan has some), or converted here."""
    import actsparse

    from .moe_finetune import load_finetuned

    t0 = time.perf_counter()
    if args.plan is not None:
        model, plan = load_finetuned(copy.deepcopy(teacher), args.plan)
    else:
        kw = {k: getattr(args, k) for k in ("features", "router", "hidden") if getattr(args, k) is not None}
        if args.calib_tokens is not None:
            kw["token_budget"] = args.calib_tokens
        model, plan = actsparse.moefy(copy.deepcopy(teacher), experts=args.experts, density=args.density,
                                      calibration=train.cpu(), seed=args.seed, **kw)
        if args.save_plan:
            plan.save(args.save_plan)
    return model, plan, time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    msg = _check(args)
    if msg:
        return fail(msg)
    try:
        cfg = _config(args)
    except ValueError as e:
        return fail(str(e).removeprefix("finetune_moe: "))

    from .moe_finetune import adapters_path, finetune_moe, save_finetuned
    from .sequences import cached_sequences

    teacher, err = load_model(args.model, args.dtype, args.device)
    if err:
        return fail(err)
    train, held, sample_s = cached_sequences(teacher, cfg.samples, cfg.held_out, cfg.seq_len, args.sequences,
                                             seed=cfg.seed, temperature=cfg.temperature, top_k=cfg.top_k)
    try:
        student, plan, convert_s = _student(teacher, args, train)
    except (ValueError, KeyError, OSError) as e:
        return fail(f"cannot {'use --plan' if args.plan else 'convert'} for model {args.model!r}: {e}")
    try:
        new, res = finetune_moe(student, plan, teacher, cfg, sequences=train, held_out=held, progress=args.progress)
    except ValueError as e:
        return fail(str(e).removeprefix("finetune_moe: "))
    stale = adapters_path(args.out)
    if not cfg.lora and stale.is_file():
        stale.unlink()  # an earlier run's adapters would be read back with this plan
    files = save_finetuned(student, new, args.out)
    density = float(new.info["density"])
    summary = {"model": args.model, "recipe": NAME, "finetune": cfg.train,
               "experts": int(new.info.get("experts", 0)) or None, "target_density": density,
               "converted_from": args.plan or "here", "config": res.config, "tokens": res.tokens, "steps": res.steps,
               "train_seconds": round(res.seconds, 1), "sample_seconds": round(sample_s, 1),
               "convert_seconds": round(convert_s, 1), "recalibration_seconds": round(res.recalibration_seconds, 1),
               "before": {"kl": res.held_out_kl_before, "density": 1.0 - mean(plan.measured)},
               "after": {"kl": res.held_out_kl_after, "density": mean(res.density), "density_per_mlp": res.density},
               "kl_per_step": res.kl, "plan": str(files["plan"]),
               "adapters": str(files["adapters"]) if "adapters" in files else None, "device": str(args.device)}
    print(f"held-out KL {res.held_out_kl_before:.4f} -> {res.held_out_kl_after:.4f}; experts run "
          f"{mean(res.density):.3f} (target {density:g}); {res.tokens} tokens in {res.seconds:.0f}s; plan {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0
