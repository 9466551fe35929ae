"""The `actsparse` command: calibrate | quantize | eval | train | sites.

Each subcommand's options live next to the code they configure; this module only wires them.
"""

from __future__ import annotations

import argparse
import sys


def _sites_command(args: argparse.Namespace) -> int:
    """Print the site table of a model: what the backend finds, and a plan's rule for each."""
    import torch

    import actsparse
    from actsparse import models
    from actsparse.passes import site_table

    try:
        model, _ = models.load(args.model)
        plan = actsparse.SparsityPlan.load(args.plan, model=model) if args.plan else actsparse.SparsityPlan()
    except (ValueError, FileNotFoundError, models.ModelNotInstalledError) as e:
        print(f"actsparse sites: error: {e}", file=sys.stderr)
        return 2
    be = actsparse.backend(plan, compiler="eager", relayout="off")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.forward, backend=be)(input_ids=torch.tensor([[1, 2, 3, 4]]))
    print(site_table(be.sites))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actsparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from .calibration.command import add_calibrate_arguments
    from .eval.command import add_eval_arguments

    add_eval_arguments(sub.add_parser("eval", help="perplexity and zero-shot accuracy, dense or with --plan"))

    add_calibrate_arguments(sub.add_parser("calibrate", help="make a sparsity plan from text"))

    from .quant.command import add_quantize_arguments
    add_quantize_arguments(sub.add_parser("quantize", help="quantize a model's linears (int8 / int4) and save them"))

    from .train.command import add_train_arguments
    add_train_arguments(sub.add_parser("train", help="fine-tune by self-distillation: relufied (default) or MoE"))

    sites = sub.add_parser("sites", help="print the table of sites the backend finds in a model")
    sites.add_argument("--model", default="smollm2-135m")
    sites.add_argument("--plan", default=None, help="show this plan's rule for each site")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        from .eval.command import run_eval_command

        return run_eval_command(args)
    if args.command == "calibrate":
        from .calibration.command import run_calibrate_command

        return run_calibrate_command(args)
    if args.command == "quantize":
        from .quant.command import run_quantize_command

        return run_quantize_command(args)
    if args.command == "train":
        from .train.command import run_train_command

        return run_train_command(args)
    if args.command == "sites":
        return _sites_command(args)
    return 2
