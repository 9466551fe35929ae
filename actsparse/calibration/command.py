"""`actsparse calibrate`: argument definitions and the command itself.

Calibration text is WikiText-2 test articles 0-9; articles 10+ are left for evaluation, so a
plan is never evaluated on the text it was fitted to. User errors print one line to stderr
and return exit code 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..eval.data import MissingDataError, data_path
from ..models import parse_dtype
from .data import CALIBRATION_ARTICLES
from .method import METHODS, CalibrationError, check_options, get_method


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `calibrate` options to ``parser`` (validation happens in run_calibrate_command)."""
    add = parser.add_argument
    add("--model", default="smollm2-135m", help="model name for actsparse.models.load (default: %(default)s)")
    add("--method", default="teal-greedy", help=f"one of {', '.join(METHODS)} (default: %(default)s)")
    add("--sparsity", type=float, default=0.5,
        help="target sparsity in [0, 1): of every masked linear input (teal, teal-greedy, stat-topk) "
             "or of MLP neurons (cats, cett) (default: %(default)s)")
    add("--wina", action="store_true", help="score |x_i| * ||W[:, i]|| (teal, teal-greedy)")
    add("--error-budget", type=float, default=None,
        help="cett: output-error budget (e.g. 0.2); without it the budget reaching --sparsity is searched")
    add("--head-density", type=float, default=None,
        help="add attention head routers keeping this mean fraction of heads (KV groups) per token, "
             "to any method; with --method polar, the routers alone")
    add("--head-tokens", type=int, default=8192, help="tokens the head routers train on (default: %(default)s)")
    add("--tokens", type=int, default=16384, help="calibration token budget (default: %(default)s)")
    add("--seq-len", type=int, default=512, help="calibration sequence length (default: %(default)s)")
    add("--batch-size", type=int, default=4, help="sequences per forward pass (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the calibration subset (default: %(default)s)")
    add("--data", default=None, metavar="DIR", help="data directory (default: $ACTSPARSE_DATA)")
    add("--calibration-articles", type=int, default=CALIBRATION_ARTICLES, metavar="N",
        help="WikiText-2 test articles 0..N-1 calibrate, N+ are left for evaluation (default: %(default)s)")
    add("--dtype", default="float32", help="float32, bfloat16 or float16 (default: %(default)s)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add("--out", required=True, metavar="PLAN.json", help="where to write the plan")
    add("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser


class _UsageError(Exception):
    pass


def _validate(args: argparse.Namespace) -> None:
    if args.head_density is not None and not 0.0 < args.head_density <= 1.0:
        raise _UsageError(f"--head-density must be in (0, 1], got {args.head_density}")
    try:
        method = get_method(args.method)
        options = _options(args)
        check_options(method, options)
        if method.targets_heads and args.head_density is None:
            raise _UsageError(f"--method {args.method} needs --head-density (the mean fraction of heads kept)")
        if not method.targets_heads:
            method.check_target(args.sparsity, options)
    except CalibrationError as e:
        raise _UsageError(str(e).replace("error_budget", "--error-budget").replace("wina ", "--wina ")
                          .replace("sparsity must", "--sparsity must")) from None
    for flag, value, low in (("--tokens", args.tokens, 1), ("--head-tokens", args.head_tokens, 2),
                             ("--seq-len", args.seq_len, 2),
                             ("--batch-size", args.batch_size, 1), ("--calibration-articles",
                                                                    args.calibration_articles, 1)):
        if value < low:
            raise _UsageError(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise _UsageError(f"--threads must be >= 1, got {args.threads}")
    try:
        parse_dtype(args.dtype)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    try:
        data_path("wikitext2", args.data)
    except MissingDataError as e:
        raise _UsageError(str(e)) from None
    out = Path(args.out)
    if out.is_dir():
        raise _UsageError(f"--out {out} is a directory; give the plan's file name")


def _options(args: argparse.Namespace) -> dict:
    """The method options the command line set (unset ones are left to the method)."""
    return {k: v for k, v in (("wina", args.wina), ("error_budget", args.error_budget)) if v not in (None, False)}


def run_calibrate_command(args: argparse.Namespace) -> int:
    """Load the model, calibrate on WikiText-2 articles 0..N-1, write the plan; returns the exit code."""
    try:
        _validate(args)
    except _UsageError as e:
        print(f"actsparse calibrate: error: {e}", file=sys.stderr)
        return 2

    import torch

    from .. import models
    from .calibrator import calibrate
    from .data import wikitext2_split

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cal_text, _, split = wikitext2_split(args.data, args.calibration_articles)
    except (CalibrationError, ValueError) as e:
        print(f"actsparse calibrate: error: {e}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = models.load(args.model, dtype=args.dtype)
    except (ValueError, KeyError, models.ModelNotInstalledError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"actsparse calibrate: error: cannot load model {args.model!r}: {msg}", file=sys.stderr)
        return 2
    try:
        plan = calibrate(model, cal_text, args.method, args.sparsity, tokenizer,
                         token_budget=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                         progress=args.progress, seed=args.seed, source=split["source"],
                         head_density=args.head_density, head_tokens=args.head_tokens, **_options(args))
    except CalibrationError as e:
        print(f"actsparse calibrate: error: {e}", file=sys.stderr)
        return 2
    plan.info["model_name"] = args.model
    path = plan.save(args.out)
    print(f"{plan.summary()} -> {path}")
    return 0
