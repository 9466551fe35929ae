"""GPU, batch 1: the sparse + low-rank (rsparse) linear against TEAL at the same effective sparsity.

    python -m benchmarks.rsparse_gpu --out benchmarks/results/rsparse_gpu_h100.json

Kernel: at Llama-3-8B shapes in bf16, for each effective sparsity s and rank r, one
``sparse_linear`` on the mask at sparsity ``s + r (in + out) / (in * out)`` (so that weights and
factors together read ``1 - s`` of the dense bytes) plus ``lowrank_complement`` (two thin
GEMVs), against ``sparse_linear`` alone at s (TEAL, rank 0) and dense cuBLAS; every timed call
is a replay of a CUDA graph of many calls rotating over weight copies (``harness.bench_calls``).
End to end: a random-weight Llama-3-8B (``--layers`` to cut it) decoding with the lean loop of
``benchmarks.e2e`` under CUDA graphs: dense Inductor, a TEAL plan at s, and an rsparse plan of
rank r on every linear at the same effective sparsity (factors random: speed depends on shapes).
Rows: ``{"variant", "batch", "sparsity", "tok_s" or "us", "vs_dense", ...}``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.harness import (bench_calls, log, masked_ref, rel_err, result, threshold_for, weight_copies,
                                write_json)

SHAPES = {"gate_up 4096->14336": (4096, 14336), "down 14336->4096": (14336, 4096),
          "q_o 4096->4096": (4096, 4096), "k_v 4096->1024": (4096, 1024)}


def mask_sparsity(s_eff: float, rank: int, k: int, n: int) -> float:
    """The mask sparsity at which weights plus factors read ``1 - s_eff`` of the dense bytes."""
    return s_eff + rank * (k + n) / (k * n)


def bench_kernels(rows: list, sparsities, ranks, deadline: float) -> None:
    import torch.nn.functional as F

    from actsparse.ops import constants
    from actsparse.ops.lowrank_complement import lowrank_complement
    from actsparse.ops.sparse_linear import sparse_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (k, n) in SHAPES.items():
        copies = weight_copies(k * n * 2)
        ws = [(torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(torch.bfloat16) for _ in range(copies)]
        wi = [w.t().contiguous().t() for w in ws]  # input-major, as the backend stores masked weights
        xs = [torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16) for _ in range(8)]
        t_dense = bench_calls([lambda i=i: F.linear(xs[i % 8], ws[i % copies]) for i in range(2 * copies)])
        rows.append({"variant": "dense", "kernel": name, "batch": 1, "sparsity": 0.0, "us": t_dense, "vs_dense": 1.0})
        for s in sparsities:
            for r in ranks:
                if time.time() > deadline:
                    return
                sm = mask_sparsity(s, r, k, n)
                if sm >= 0.99:
                    continue
                t = threshold_for(sm)
                scope = constants.ConstantScope()
                keys = [scope.add("bench", (torch.randn(n, r, device="cuda", generator=g) / r ** 0.5).to(torch.bfloat16),
                                  (torch.randn(r, k, device="cuda", generator=g) / k ** 0.5).to(torch.bfloat16))
                        for _ in range(copies)] if r else []

                def call(i, r=r, t=t, sm=sm, keys=keys):
                    y = sparse_linear(xs[i % 8], [wi[i % copies]], [None], [t], False, sm)[0]
                    return y if not r else y + lowrank_complement(xs[i % 8], keys[i % copies], n, t)

                ref = masked_ref(xs[0].float(), t) @ ws[0].float().t()
                if r:
                    a, b = constants.lookup(keys[0])
                    xc = xs[0].float() - masked_ref(xs[0].float(), t)
                    ref = ref + (xc @ b.float().t()) @ a.float().t()
                err = rel_err(call(0), ref)
                us = bench_calls([lambda i=i: call(i) for i in range(2 * copies)])
                rows.append({"variant": "teal" if r == 0 else f"rsparse-r{r}", "kernel": name, "batch": 1,
                             "sparsity": s, "mask_sparsity": round(sm, 4), "rank": r, "us": us,
                             "vs_dense": t_dense / us, "ideal": 1 / (1 - s), "rel_err": err})
                constants.release(tuple(scope.keys))
                log(f"{name} s={s:.2f} r={r}: {us:.1f} us, x{t_dense / us:.2f} of dense (ideal x{1 / (1 - s):.2f})")


def build_rsparse(model, calib, s_eff: float, rank: int):
    """An rsparse plan of ``rank`` on every decoder linear, each mask at the sparsity that keeps
    the effective one at ``s_eff`` (thresholds calibrated for it); random factors."""
    from actsparse.plan import SparsityPlan, fingerprint
    from actsparse.plan.rules.rsparse import LowRankSparse
    from benchmarks.e2e import calibrate_on_tokens

    mods = dict(model.named_modules())
    names = []
    plans = {}
    g = torch.Generator(device="cuda").manual_seed(1)
    specs, factors = {}, {}
    base = calibrate_on_tokens(model, calib, s_eff)
    for name in base.thresholds:
        n, k = mods[name].weight.shape
        sm = min(0.95, mask_sparsity(s_eff, rank, k, n))
        names.append((name, k, n, sm))
    for sm in sorted({x[3] for x in names}):
        plans[sm] = calibrate_on_tokens(model, calib, sm)
    for name, k, n, sm in names:
        specs[name] = {"threshold": plans[sm].thresholds[name], "sparsity": round(sm, 6), "rank": rank,
                       "in_features": k, "out_features": n}
        factors[f"{name}.a"] = torch.randn(n, rank, device="cuda", generator=g) / rank ** 0.5
        factors[f"{name}.b"] = torch.randn(rank, k, device="cuda", generator=g) / k ** 0.5
    plan = SparsityPlan(rules=[LowRankSparse(specs, factors)], method="rsparse-random", target=s_eff,
                        model=fingerprint(model))
    plan.measured = {n: sm for n, _, _, sm in names}
    return plan


def bench_e2e(rows: list, args, deadline: float) -> None:
    import actsparse
    from actsparse.models import shaped
    from benchmarks.e2e import _dense_backend, calibrate_on_tokens, lean_decode_rate

    model = shaped(args.model, dtype=torch.bfloat16, device="cuda", num_layers=args.layers)
    g = torch.Generator(device="cuda").manual_seed(0)
    calib = torch.randint(0, 128000, (1, 512), device="cuda", generator=g)
    ids = torch.randint(0, 128000, (1, 32), device="cuda", generator=g)
    dense = lean_decode_rate(model, _dense_backend(), ids, args.new_tokens, args.repeats)
    rows.append({"variant": "dense", "batch": 1, "sparsity": 0.0, "tok_s": dense, "vs_dense": 1.0, "e2e": True})
    log(f"e2e dense: {dense:.1f} tok/s")
    for s in args.sparsity:
        for r in [0] + list(args.ranks):
            if time.time() > deadline:
                return
            plan = calibrate_on_tokens(model, calib, s) if r == 0 else build_rsparse(model, calib, s, r)
            actsparse.prepare(model, plan)
            rate = lean_decode_rate(model, actsparse.backend(plan, cudagraphs=True), ids, args.new_tokens, args.repeats)
            rows.append({"variant": "teal" if r == 0 else f"rsparse-r{r}", "batch": 1, "sparsity": s, "rank": r,
                         "tok_s": rate, "vs_dense": rate / dense, "e2e": True})
            log(f"e2e s={s:.2f} r={r}: {rate:.1f} tok/s, x{rate / dense:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rsparse_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.4])
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=540, help="stop starting new rows after this")
    p.add_argument("--no-e2e", dest="e2e", action="store_false")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    deadline = time.time() + args.budget_s
    rows: list = []
    res = result("python -m benchmarks.rsparse_gpu " + " ".join(sys.argv[1:] if argv is None else argv), rows,
                 note="effective sparsity: 1 - (mask-kept weights + low-rank factors) / dense weights")
    try:
        bench_kernels(rows, args.sparsity, [0] + list(args.ranks), deadline)
        write_json(args.out, res)
        if args.e2e:
            bench_e2e(rows, args, deadline)
    finally:
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
