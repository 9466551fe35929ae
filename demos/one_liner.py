"""One line: ``torch.compile(model, backend="sparse")`` on SmolLM2-135M, on the CPU.

    python -m demos.one_liner

No plan, no calibration: the backend applies calibration-free statistical top-k at a
conservative default sparsity (and says so once). The same prompt goes through the dense and
the sparse model; the demo prints both completions and the share of every decoder linear's
input that was zero.
"""

from __future__ import annotations

import sys
import warnings

import torch


def main() -> int:
    import actsparse  # noqa: F401  (registers backend="sparse" where the package is not installed)
    from actsparse import models
    from actsparse.compiler.options import DEFAULT_SPARSITY

    try:
        model, tok = models.load("smollm2-135m")
    except models.ModelNotInstalledError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    ids = tok("The history of the printing press", return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=20, do_sample=False)
    model.forward = torch.compile(model.forward, backend="sparse")  # <- the one line
    with warnings.catch_warnings(record=True) as notes, torch.no_grad():
        warnings.simplefilter("always")
        sparse = model.generate(ids, max_new_tokens=20, do_sample=False)
    for n in notes:
        if "actsparse" in str(n.message):
            print(f"note: {n.message}")
    print(f"dense : {tok.decode(dense[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    print(f"sparse: {tok.decode(sparse[0, ids.shape[1]:], skip_special_tokens=True)!r} "
          f"(statistical top-k, {DEFAULT_SPARSITY:.0%} of each linear input zeroed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
