"""Hugging Face ``generate`` with the sparse backend: a calibrated plan, then ordinary generation.

    python -m demos.generate [--model smollm2-135m] [--sparsity 0.4] [--head-density 0.75]

Calibrates a TEAL plan with greedy allocation (and, with --head-density, attention head
routers) on WikiText-2 articles, then generates with it. On a GPU, ``generate`` compiles the
decode step itself through ``compile_config`` (CUDA graphs, static cache); on the CPU, where
Hugging Face does not compile, the demo compiles ``model.forward``.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demos.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--head-density", type=float, default=None)
    p.add_argument("--prompt", default="The history of the printing press")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--data", default=None, help="evaluation data directory (default: $ACTSPARSE_DATA)")
    args = p.parse_args(argv)

    import actsparse
    from actsparse import models
    from actsparse.calibration import wikitext2_split

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tok = models.load(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                 device=device)
        calib, _, _ = wikitext2_split(args.data)
    except (ValueError, FileNotFoundError, models.ModelNotInstalledError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    plan = actsparse.calibrate(model, calib, "teal-greedy", args.sparsity, tok, token_budget=4096,
                               head_density=args.head_density, head_tokens=4096)
    print(plan.summary())
    actsparse.prepare(model, plan)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(device)
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static")
    if device == "cuda":
        from transformers import CompileConfig

        kw["compile_config"] = CompileConfig(backend=actsparse.backend(plan, cudagraphs=True), mode=None)
    else:
        model.forward = torch.compile(model.forward, backend=actsparse.backend(plan))
    with torch.no_grad():
        out = model.generate(ids, **kw)
    print(f"{args.prompt!r} -> {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
