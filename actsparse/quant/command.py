"""`actsparse quantize`: quantize an offline model once and save its weights.

    actsparse quantize --model smollm2-135m --bits 4 --group-size 64 --rounding gptq-act --out m4.safetensors
    actsparse eval --model smollm2-135m --quantized m4.safetensors --plan plan.json

GPTQ rounding and the ``clip="mse"`` ranges take their calibration tokens from WikiText-2
test articles 0-9, as plans do (articles 10+ stay for evaluation). The file
(``actsparse.quant.files``) records how it was made. User errors print one line to stderr and
return exit code 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .storage import BITS, CLIPS, GROUP_SIZES

#: ``--rounding`` choices (``actsparse.quantize``'s ``rounding``).
ROUNDINGS = ("nearest", "gptq", "gptq-act")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `quantize` options to ``parser`` (validation happens in run_quantize_command)."""
    add = parser.add_argument
    add("--model", default="smollm2-135m", help="model name for actsparse.models.load (default: %(default)s)")
    add("--bits", type=int, required=True, choices=list(BITS), help="8 (symmetric int8) or 4 (int4 with offsets)")
    add("--group-size", type=int, default=None, choices=list(GROUP_SIZES),
        help="input channels per scale (int4: default the largest that divides every width; int8: "
             "default one scale per output channel)")
    add("--clip", default="minmax", choices=list(CLIPS), help="int4 ranges: full or least-squared-error (default: %(default)s)")
    add("--rounding", default="gptq-act", choices=list(ROUNDINGS),
        help="nearest code, GPTQ, or GPTQ with act order (default: %(default)s)")
    add("--plan", default=None, metavar="PLAN.json",
        help="GPTQ: fit the weights to the inputs this plan's masks leave (the sparse model they will run in)")
    add("--tokens", type=int, default=4096, help="calibration tokens for GPTQ and --clip mse (default: %(default)s)")
    add("--seq-len", type=int, default=512, help="calibration sequence length (default: %(default)s)")
    add("--hessian-memory-gb", type=float, default=4.0,
        help="GPTQ: at most this many GB of input Hessians at once (default: %(default)s)")
    add("--data", default=None, metavar="DIR", help="data directory (default: $ACTSPARSE_DATA)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add("--out", required=True, metavar="FILE.safetensors", help="where to write the quantized weights")
    add("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser


class _UsageError(Exception):
    pass


def _needs_tokens(args: argparse.Namespace) -> bool:
    return args.rounding != "nearest" or (args.bits == 4 and args.clip == "mse")


def _validate(args: argparse.Namespace) -> None:
    if args.plan is not None and args.rounding == "nearest":
        raise _UsageError("--plan fits GPTQ's rounding to the sparse model: it takes --rounding gptq or gptq-act")
    if args.plan is not None and not Path(args.plan).is_file():
        raise _UsageError(f"plan file not found: {Path(args.plan).resolve()}")
    if args.clip != "minmax" and args.bits != 4:
        raise _UsageError("--clip chooses int4 ranges; int8 takes the full range")
    if args.seq_len < 2 or args.tokens < args.seq_len:
        raise _UsageError(f"--tokens ({args.tokens}) must hold at least one --seq-len ({args.seq_len}) sequence, "
                          "and --seq-len must be >= 2")
    if args.hessian_memory_gb <= 0:
        raise _UsageError(f"--hessian-memory-gb must be positive, got {args.hessian_memory_gb}")
    if args.threads is not None and args.threads < 1:
        raise _UsageError(f"--threads must be >= 1, got {args.threads}")
    if _needs_tokens(args):
        from ..eval.data import MissingDataError, data_path

        try:
            data_path("wikitext2", args.data)
        except MissingDataError as e:
            raise _UsageError(str(e)) from None
    if Path(args.out).is_dir():
        raise _UsageError(f"--out {args.out} is a directory; give the file's name")


def run_quantize_command(args: argparse.Namespace) -> int:
    """Load the model, quantize it, write its quantized weights; returns the exit code."""
    try:
        _validate(args)
    except _UsageError as e:
        print(f"actsparse quantize: error: {e}", file=sys.stderr)
        return 2

    import torch

    from .. import models
    from . import quantize
    from .files import quantized_modules, save_quantized

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = models.load(args.model)
    except (ValueError, KeyError, models.ModelNotInstalledError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"actsparse quantize: error: cannot load model {args.model!r}: {msg}", file=sys.stderr)
        return 2
    plan = None
    if args.plan is not None:
        from ..plan import SparsityPlan

        try:
            plan = SparsityPlan.load(args.plan, model=model)
        except (ValueError, FileNotFoundError) as e:
            print(f"actsparse quantize: error: plan {args.plan}: {e}", file=sys.stderr)
            return 2
    ids, source = None, None
    if _needs_tokens(args):
        from ..calibration.data import wikitext2_split

        text, _, split = wikitext2_split(args.data)
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
        if ids.shape[1] < args.tokens:
            print(f"actsparse quantize: error: --tokens {args.tokens}: the calibration text has only "
                  f"{ids.shape[1]} tokens", file=sys.stderr)
            return 2
        ids = ids[:, : ids.shape[1] // args.seq_len * args.seq_len].reshape(-1, args.seq_len)
        source = split["calibration"]
    opts = {"clip": args.clip, "rounding": args.rounding, "plan": plan, "progress": args.progress,
            "hessian_memory_gb": args.hessian_memory_gb}
    if ids is not None:
        opts["tokens"] = ids
    try:
        quantize(model, bits=args.bits, group_size=args.group_size, **opts)
    except ValueError as e:
        print(f"actsparse quantize: error: {e}", file=sys.stderr)
        return 2
    layers = list(quantized_modules(model).values())
    group = layers[0].group_size if layers else args.group_size
    info = {"model_name": args.model, "bits": args.bits, "group_size": group or None, "clip": args.clip,
            "rounding": args.rounding, "calibration_tokens": None if ids is None else int(ids.numel()),
            "calibration_text": source,
            "plan": None if plan is None else {"path": str(args.plan), "method": plan.method, "target": plan.target}}
    path = save_quantized(model, args.out, info=info)
    fmt = f"int{args.bits}" + (f" g{group}" if group else "")
    print(f"{len(layers)} linears as {fmt} ({args.rounding}) -> {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0
