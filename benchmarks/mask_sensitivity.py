"""How far threshold masks carry a last-bit difference: logits under tiny input perturbations.

    python -m benchmarks.mask_sensitivity --model smollm2-135m --formats fp32 int8 \
        --out benchmarks/results/mask_sensitivity_smollm2-135m.json

Two correct implementations of a masked model differ in summation order, so the inputs they
mask differ in the last bits, and a channel that sits on its threshold is kept by one and
zeroed by the other; the difference then travels through every later layer. This measures
that directly: the eager model with every decoder linear's input masked at ``--threshold``
(hooks, ``actsparse.eval.masked``), against the same with each masked input first multiplied by
``1 + eps * N(0, 1)``, and against the sparse backend's graph (``compiler="eager"``: the same
ops run one by one; ``"inductor"``: the glue compiled), all on one forward over the same
tokens. ``vs_reference``: ``||logits - reference|| / ||reference||`` per position (median and
max) and the share of positions whose argmax agrees. Files: ``{"cpu", "command", "rows"}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch


def _linear_names(model) -> list[str]:
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per-position relative logit difference (median, max) and argmax agreement."""
    got, ref = got.reshape(-1, got.shape[-1]).float(), ref.reshape(-1, ref.shape[-1]).float()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    return {"median_rel_logit_diff": statistics.median(rel), "max_rel_logit_diff": max(rel),
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def perturbed(model, names: list[str], eps: float, seed: int):
    """Pre-hooks (registered before the masks' hooks, so they run first) that multiply each
    named linear's input by ``1 + eps * N(0, 1)``; returns their handles."""
    gen = torch.Generator().manual_seed(seed)

    def hook(mod, args):
        x = args[0]
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
        return (x * (1 + eps * noise),) + args[1:]

    return [model.get_submodule(n).register_forward_pre_hook(hook) for n in names]


def measure(model, ids: torch.Tensor, threshold: float, eps_list: list[float], compilers: list[str],
            seed: int = 0) -> list[dict]:
    """The rows of one model: each perturbation, then each compiler, against the masked eager forward."""
    import actsparse
    from actsparse.eval.masked import masked

    names = _linear_names(model)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: threshold for n in names})
    with torch.no_grad(), masked(model, plan):
        ref = model(ids).logits
    rows = []
    for eps in eps_list:
        handles = perturbed(model, names, eps, seed)
        try:
            with torch.no_grad(), masked(model, plan):
                got = model(ids).logits
        finally:
            for h in handles:
                h.remove()
        rows.append({"variant": f"eager, inputs x (1 + {eps:g} N(0,1))", "eps": eps, **compare(got, ref)})
    for compiler in compilers:
        torch._dynamo.reset()
        fwd = torch.compile(model.forward, backend=actsparse.backend(plan, compiler=compiler))
        with torch.no_grad():
            got = fwd(input_ids=ids).logits
        torch._dynamo.reset()
        rows.append({"variant": f"sparse backend, compiler={compiler}", "eps": None, **compare(got, ref)})
    for r in rows:
        r.update(threshold=threshold, masked_linears=len(names))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mask_sensitivity", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "int4"])
    p.add_argument("--threshold", type=float, default=0.05, help="every decoder linear's input cutoff")
    p.add_argument("--eps", type=float, nargs="+", default=[0.0, 1e-7, 1e-6, 1e-5])
    p.add_argument("--compilers", nargs="*", default=["eager", "inductor"], choices=["eager", "inductor"])
    p.add_argument("--tokens", type=int, default=64, help="tokens of the evaluation text in the one forward")
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import actsparse
    from actsparse.calibration.data import wikitext2_split
    from actsparse.models import load

    torch.set_num_threads(args.threads)
    base, tok = load(args.model)
    _, text, _ = wikitext2_split(args.data)
    ids = tok(text[:20000], return_tensors="pt").input_ids[:, : args.tokens]
    result = {"cpu": f"{platform.machine()} ({os.cpu_count()} logical cores)",
              "command": "python -m benchmarks.mask_sensitivity " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "tokens": ids.shape[1], "torch": torch.__version__, "rows": []}
    for fmt in args.formats:
        model = base if fmt == "fp32" else actsparse.quantize(copy.deepcopy(base), bits=8 if fmt == "int8" else 4)
        for row in measure(model, ids, args.threshold, args.eps, args.compilers):
            result["rows"].append({"format": fmt, **row})
            print(f"[mask_sensitivity] {fmt} {row['variant']}: median {row['median_rel_logit_diff']:.2e}, "
                  f"max {row['max_rel_logit_diff']:.2e}, argmax {row['argmax_agreement']:.3f}", flush=True)
    if args.out:
        from benchmarks.harness import write_json

        write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
