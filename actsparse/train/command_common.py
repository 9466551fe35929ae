"""What both `actsparse train` recipes need: the one-line user error, the model loader (real
names and ``tiny:<arch>``) and the checks made before any model is loaded."""

from __future__ import annotations

import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def fail(msg) -> int:
    """Print a user error on one line to stderr; the command's exit code (2)."""
    print(f"actsparse train: error: {msg}", file=sys.stderr)
    return 2


def check_common(args) -> str | None:
    """The first problem with the options both recipes share, or None."""
    if args.dtype not in DTYPES:
        return f"--dtype must be float32 or bfloat16, got {args.dtype!r}"
    if args.held_out < 1:
        return f"--held-out must be >= 1, got {args.held_out}"
    if args.max_minutes < 0:
        return f"--max-minutes must be >= 0, got {args.max_minutes}"
    if not Path(args.out).parent.is_dir():
        return f"directory of --out does not exist: {Path(args.out).parent}"
    if Path(args.out).is_dir():
        return f"--out {args.out} is a directory; give a file name"
    if args.json and not Path(args.json).parent.is_dir():
        return f"directory of --json does not exist: {Path(args.json).parent}"
    return None


def load_model(name: str, dtype: str, device: str):
    """(model, None) or (None, the error message): ``actsparse.models.load`` or ``tiny:<arch>``."""
    import torch

    from .. import models

    try:
        if name.startswith("tiny:"):
            return models.tiny(name.split(":", 1)[1], dtype=getattr(torch, dtype)).to(device), None
        model, _ = models.load(name, dtype=getattr(torch, dtype), device=device)
        return model, None
    except (ValueError, KeyError, FileNotFoundError, models.ModelNotInstalledError) as e:
        return None, f"cannot load model {name!r}: {e}"


def mean(d) -> float:
    vals = list(d.values()) if isinstance(d, dict) else list(d)
    return sum(vals) / max(len(vals), 1)
