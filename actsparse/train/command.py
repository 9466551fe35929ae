"""`actsparse train`: fine-tune a model by self-distillation (sequences sampled from the dense
model itself, loss KL(teacher || student)), by one of two recipes:

* ``--recipe relufy`` (default): relufy the MLPs and fine-tune LoRA adapters (relufy_command);
* ``--recipe moe``: fine-tune a dense-to-MoE conversion's routers and/or experts (moe_command).

This module holds the options both share and wires the recipes in; an option that belongs to
one recipe only is refused for the other. ``--model tiny:<arch>`` trains a seeded random tiny
model (tests, smoke runs). User errors print one line to stderr and return 2.
"""

from __future__ import annotations

import argparse

from . import moe_command, relufy_command
from .command_common import check_common, fail
from .distill import DistillConfig

RECIPES = {m.NAME: m for m in (relufy_command, moe_command)}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    d = DistillConfig()
    add("--recipe", default="relufy", help=f"{' or '.join(RECIPES)} (default: %(default)s)")
    add("--model", default="smollm2-135m", help="actsparse.models.load name, or tiny:<arch> (default: %(default)s)")
    add("--out", required=True, metavar="PATH",
        help="relufy: adapter file to write (.safetensors); moe: the fine-tuned plan (.json)")
    add("--json", default=None, metavar="PATH", help="write a summary of the run as JSON here")
    add("--steps", type=int, default=None, help="training steps (default: relufy 100, moe 200)")
    add("--batch-size", type=int, default=d.batch_size)
    add("--seq-len", type=int, default=d.seq_len)
    add("--samples", type=int, default=d.samples, help="teacher-sampled training sequences (default: %(default)s)")
    add("--held-out", type=int, default=8, help="further teacher samples to measure the KL (and sparsity) on")
    add("--lr", type=float, default=d.lr, help="LoRA learning rate (default: %(default)s)")
    add("--rank", type=int, default=d.rank)
    add("--alpha", type=float, default=d.alpha)
    add("--targets", default=None, help="linears that get adapters (default: relufy all, moe the MLP's)")
    add("--temperature", type=float, default=d.temperature)
    add("--top-k", type=int, default=d.top_k)
    add("--seed", type=int, default=d.seed)
    add("--max-minutes", type=float, default=0.0, help="stop training after this long (default: 0, every step)")
    add("--dtype", default="float32", help="float32 or bfloat16 (default: %(default)s)")
    add("--device", default="cpu")
    add("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    for recipe in RECIPES.values():
        recipe.add_arguments(parser)
    return parser


def _foreign_option(args: argparse.Namespace) -> str | None:
    """The first option given that belongs to another recipe than ``args.recipe``."""
    for name, recipe in RECIPES.items():
        if name != args.recipe:
            for dest in recipe.OWN:
                if getattr(args, dest, None) is not None:
                    return f"--{dest.replace('_', '-')} belongs to --recipe {name}, not --recipe {args.recipe}"
    return None


def run_train_command(args: argparse.Namespace) -> int:
    if args.recipe not in RECIPES:
        return fail(f"unknown --recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[args.recipe]
    msg = _foreign_option(args)
    if msg:
        return fail(msg)
    for dest, value in recipe.DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    msg = check_common(args)
    if msg:
        return fail(msg)
    return recipe.run(args)
