"""`actsparse eval`: argument definitions and the command itself.

The CLI module only wires these in, so the evaluation options live next to the
code they configure. User errors (unknown task, bad dtype, missing data or plan
file, bad numbers) print one line to stderr and return exit code 2, before any
model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data import TASKS, MissingDataError, check_task, data_path

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `eval` options to ``parser`` (validation happens in run_eval_command)."""
    add = parser.add_argument
    add("--model", default="smollm2-135m", help="model name for actsparse.models.load (default: %(default)s)")
    add("--tasks", default=",".join(TASKS), help="comma-separated tasks from: %(default)s")
    add("--limit", type=int, default=None, metavar="N",
        help="examples per zero-shot task, a seeded random subset (default: all)")
    add("--ppl-tokens", type=int, default=8192, metavar="N",
        help="WikiText-2 tokens scored, from the start; 0 = whole text (default: %(default)s)")
    add("--window", type=int, default=512, help="perplexity context window in tokens (default: %(default)s)")
    add("--stride", type=int, default=None,
        help="sliding-window stride; below --window only the last STRIDE tokens of a window are scored "
             "(default: window)")
    add("--batch-size", type=int, default=8, help="sequences per forward pass (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the zero-shot subsets (default: %(default)s)")
    add("--dtype", default="float32", help="float32, bfloat16 or float16 (default: %(default)s)")
    add("--device", default="cpu", help="torch device (default: %(default)s)")
    add("--data", default=None, metavar="DIR", help="evaluation data directory (default: $ACTSPARSE_DATA)")
    add("--out", default=None, metavar="PATH", help="write the results as JSON here")
    add("--plan", default=None, metavar="PATH", help="sparsity plan to apply before evaluating (default: dense)")
    add("--quantized", default=None, metavar="PATH",
        help="quantized weights to load into the model first (`actsparse quantize`'s file)")
    add("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser


def _prepare_model(model, args: argparse.Namespace):
    """Load ``args.quantized`` into the model, then apply ``args.plan``: the backend's rewritten
    graph, run op by op. ValueError names the file that failed.

    Accuracy does not depend on which compiler runs the rewritten graph, so evaluation skips
    Inductor ('eager' inner compiler) and spends no time compiling each prompt length.
    """
    if getattr(args, "quantized", None):
        from ..quant import load_quantized

        try:
            load_quantized(model, args.quantized)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"quantized weights {args.quantized}: {e}") from None
    if not getattr(args, "plan", None):
        return model
    import torch

    import actsparse

    try:
        plan = actsparse.SparsityPlan.load(args.plan, model=model)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"plan {args.plan}: {e}") from None
    args._plan = plan
    model.forward = torch.compile(model.forward, dynamic=True,
                                  backend=actsparse.backend(plan, compiler="eager", relayout="off"))
    return model


def _plan_info(args: argparse.Namespace) -> dict | None:
    """What the result records about the plan: its file, method, target and sparsity."""
    if not getattr(args, "plan", None):
        return None
    info = {"path": str(args.plan)}
    plan = getattr(args, "_plan", None)
    if plan is not None:
        info.update(method=plan.method, target=plan.target, overall_sparsity=plan.overall_sparsity,
                    calibration=plan.info.get("calibration"))
    return info


class _UsageError(Exception):
    pass


def _validate(args: argparse.Namespace) -> tuple[list[str], str]:
    tasks = [t.strip() for t in str(args.tasks).split(",") if t.strip()]
    if not tasks:
        raise _UsageError(f"--tasks is empty; allowed tasks: {', '.join(TASKS)}")
    for t in tasks:
        try:
            check_task(t)
        except ValueError as e:
            raise _UsageError(str(e)) from None
    dtype = DTYPES.get(str(args.dtype).lower().removeprefix("torch."))
    if dtype is None:
        raise _UsageError(f"unknown dtype {args.dtype!r}; use float32, bfloat16 or float16")
    if args.limit is not None and args.limit < 1:
        raise _UsageError(f"--limit must be a positive number of examples, got {args.limit}")
    if args.window < 1:
        raise _UsageError(f"--window must be positive, got {args.window}")
    if args.stride is not None and not 1 <= args.stride <= args.window:
        raise _UsageError(f"--stride must be between 1 and --window ({args.window}), got {args.stride}")
    if args.ppl_tokens < 0:
        raise _UsageError(f"--ppl-tokens must be >= 0 (0 = whole text), got {args.ppl_tokens}")
    if "wikitext2" in tasks and 0 < args.ppl_tokens < args.window:
        raise _UsageError(f"--ppl-tokens {args.ppl_tokens} is less than one window (--window {args.window})")
    if args.batch_size < 1:
        raise _UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.plan is not None and not Path(args.plan).is_file():
        raise _UsageError(f"plan file not found: {Path(args.plan).resolve()}")
    if getattr(args, "quantized", None) is not None and not Path(args.quantized).is_file():
        raise _UsageError(f"quantized-weights file not found: {Path(args.quantized).resolve()}")
    for t in tasks:
        try:
            data_path(t, args.data)
        except MissingDataError as e:
            raise _UsageError(str(e)) from None
    return tasks, dtype


def run_eval_command(args: argparse.Namespace) -> int:
    """Load the model, evaluate, print the table, write JSON if asked; returns the exit code."""
    try:
        tasks, dtype_name = _validate(args)
    except _UsageError as e:
        print(f"actsparse eval: error: {e}", file=sys.stderr)
        return 2

    import torch

    from .results import run_eval

    try:
        from .. import models
    except ImportError as e:
        print(f"actsparse eval: error: cannot import actsparse.models ({e})", file=sys.stderr)
        return 1
    user_errors = (ValueError, KeyError, FileNotFoundError, getattr(models, "ModelNotInstalledError", ValueError))
    try:
        model, tokenizer = models.load(args.model, dtype=getattr(torch, dtype_name), device=args.device)
    except user_errors as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"actsparse eval: error: cannot load model {args.model!r}: {msg}", file=sys.stderr)
        return 2
    try:
        model = _prepare_model(model, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"actsparse eval: error: {e}", file=sys.stderr)
        return 2

    result = run_eval(
        model,
        tokenizer,
        tasks,
        limit=args.limit,
        seed=args.seed,
        ppl_window=args.window,
        ppl_stride=args.stride,
        ppl_tokens=args.ppl_tokens or None,
        batch_size=args.batch_size,
        data_dir=args.data,
        model_name=args.model if not getattr(args, "quantized", None) else f"{args.model} (quantized: {args.quantized})",
        plan_info=_plan_info(args),
        progress=getattr(args, "progress", True),
    )
    print(result.table())
    if args.out:
        path = result.to_json(args.out)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m actsparse.eval.command``) until the CLI wires it in."""
    parser = argparse.ArgumentParser(prog="actsparse eval", description="Perplexity and zero-shot accuracy.")
    add_eval_arguments(parser)
    return run_eval_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
