"""GPU kernel benchmark: the block-sparse expert MLP (dense-to-MoE) against the dense MLP and
the CATS gated-MLP kernel at equal weight bytes.

    PYTHONPATH=. python3 -m benchmarks.kernels_experts --out benchmarks/results/kernels_experts_h100.json

Llama-3-8B MLP (4096 -> 14336 -> 4096) in bf16, split into ``--experts`` contiguous experts.
Each token row selects a random ``density`` fraction of the experts (independently per row,
so a batch reads the union of its rows' experts: ``union_density``). Correctness first
(relative error against an fp32 reference of the same experts), then timing: a CUDA graph of
back-to-back calls over several input sets (``benchmarks.harness.bench_calls``, as
``benchmarks/kernels.py`` times the CATS kernel). ``vs_dense`` is the speedup over the dense
bf16 MLP (cuBLAS) in the same run; ``ideal`` is ``1 / union_density``; ``bw_fraction`` is the
expert bytes read per second over the measured copy bandwidth. CATS rows: the CATS kernel at the
activation sparsity that reads the same MLP bytes as the expert density
(``(1 + 2 (1 - s)) / 3 = density``: CATS reads the gate in full).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import N_SETS, bench_calls, command_line, copy_bandwidth, log, rel_err, result, write_json

CALLS = 8  # MLP calls per timed graph


def _ref32(x, mask, wg, wu, wd):
    from actsparse.ops.reference import expert_mlp_reference

    return expert_mlp_reference(x.float(), mask, wg.float(), wu.float(), wd.float(), None, None, None, "silu")


def bench(d: int, f: int, experts: int, batches, densities, deadline: float, with_cats: bool) -> list[dict]:
    from actsparse.kernels.triton import expert_mlp as em
    from actsparse.kernels.triton import gated_mlp as gm

    torch.manual_seed(0)
    mk = lambda r, c: (torch.randn(r, c, device="cuda") * 0.02).to(torch.bfloat16)  # noqa: E731
    wg, wu, wd = mk(f, d), mk(f, d), mk(d, f)
    wd_im = wd.t().contiguous().t()  # input-major, as the backend stores it
    bw = copy_bandwidth()
    mlp_bytes = 3 * d * f * 2
    rows = []
    for M in batches:
        xs = [torch.randn(M, d, device="cuda", dtype=torch.bfloat16) for _ in range(N_SETS)]

        def dense(x):
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

        t_dense = bench_calls([lambda i=i: dense(xs[i % N_SETS]) for i in range(CALLS)])
        rows.append(dict(variant="dense", batch=M, sparsity=0.0, experts=experts, us=t_dense,
                         tok_s=M / (t_dense * 1e-6), vs_dense=1.0))
        g_all = torch.cat([F.silu(x.float() @ wg.float().t()).abs().flatten() for x in xs])
        for dens in densities:
            if time.time() > deadline:
                log(f"deadline reached, skipping M={M} density={dens}")
                return rows
            gen = torch.Generator(device="cuda").manual_seed(int(dens * 1000) + M)
            masks = [torch.rand(M, experts, device="cuda", generator=gen) < dens for _ in range(N_SETS)]
            union = float(sum(m.any(0).float().mean() for m in masks) / N_SETS)
            y = em.launch_expert_mlp(xs[0], masks[0], wg, wu, wd_im, "silu")
            err = rel_err(y, _ref32(xs[0], masks[0], wg, wu, wd))
            t = bench_calls([lambda i=i: em.launch_expert_mlp(xs[i % N_SETS], masks[i % N_SETS], wg, wu, wd_im, "silu")
                             for i in range(CALLS)])
            rows.append(dict(variant="experts", batch=M, sparsity=round(1 - dens, 4), density=dens, experts=experts,
                             union_density=union, us=t, tok_s=M / (t * 1e-6), vs_dense=t_dense / t,
                             ideal=1.0 / max(union, 1e-9), rel_err=err,
                             bw_fraction=union * mlp_bytes / (t * 1e-6) / bw))
            line = f"M={M:2d} density {dens:.2f} (union {union:.2f}) dense {t_dense:7.1f}us experts {t:7.1f}us " \
                   f"x{t_dense / t:5.2f} (ideal {1 / max(union, 1e-9):4.2f}) err {err:.1e}"
            s = 1.0 - (3 * dens - 1) / 2
            if with_cats and 0.0 < s < 1.0:
                thr = float(torch.quantile(g_all[: 1 << 24], s))
                tc = bench_calls([lambda i=i: gm.launch_gated_mlp(xs[i % N_SETS], wg, wu, wd_im, "silu", threshold=thr,
                                                                   sparsity_hint=s) for i in range(CALLS)])
                rows.append(dict(variant="cats", batch=M, sparsity=round(s, 4), equal_bytes_density=dens, us=tc,
                                 tok_s=M / (tc * 1e-6), vs_dense=t_dense / tc))
                line += f" | CATS s={s:.2f} {tc:7.1f}us x{t_dense / tc:5.2f}"
            log(line)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--f", type=int, default=14336)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.667, 0.5, 0.3, 0.2, 0.1])
    p.add_argument("--no-cats", action="store_true")
    p.add_argument("--max-seconds", type=float, default=480.0)
    p.add_argument("--out", default="benchmarks/results/kernels_experts_h100.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.kernels_experts needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = bench(args.d, args.f, args.experts, args.batches, args.densities, time.time() + args.max_seconds,
                 not args.no_cats)
    write_json(args.out, result(command_line("benchmarks.kernels_experts", argv), rows,
                                shape=f"llama3-8b mlp {args.d}->{args.f}->{args.d} bf16", experts=args.experts,
                                masks="independent random experts per row; the kernel reads the batch's union"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
