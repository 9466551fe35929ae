"""Our batch-1 sparse GEMV beside TEAL's kernel, on one GPU, in one harness.

    python -m benchmarks.peers.teal_kernels --teal .peer/teal --shim .peer/shim --families compact predicated \
        --out $OUT/kernels_teal_h200.json

Llama-3-8B shapes, sparsity 0-90%: cuBLAS (bf16 and fp16, row-major weight), ours (bf16 and
fp16, input-major weight, our autotuner) and TEAL's ``splitk_sparse_gemv`` (fp16 only, its own
autotuner retuned for every shape and sparsity; and, with --teal-best, the fastest of its
configs timed in this harness). With --families, each of our kernel families alone (the
compacting kernel and the predicated one, each autotuned within itself) beside the per-key choice
between them (``ours_family``, with the times it was made on). Every variant is one CUDA graph
of back-to-back calls rotating over 4 input sets and weight copies that miss L2 (``benchmarks.harness``); the time is the
median replay over the calls. Correctness first: each variant's relative error against an fp32
reference on the same masked input. Speedups are over cuBLAS in the same dtype; ``ideal_x`` is
1 / (1 - s).

TEAL's repository is not part of this project: fetch it (FasterDecoding/TEAL) into a git-ignored
folder and give it with --teal; its ``kernels/compile_wrapper.py`` imports ``msgspec``, which the
GPU machine lacks, so --shim names a folder holding a stand-in ``msgspec.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

from benchmarks.harness import (N_SETS, bench_calls, command_line, copy_bandwidth, log, masked_ref, rel_err, result,
                                threshold_for, weight_copies, write_json)

SHAPES = {"gate_up 4096->14336": (4096, 14336), "down 14336->4096": (14336, 4096),
          "q_o 4096->4096": (4096, 4096), "k_v 4096->1024": (4096, 1024)}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
MIN_CALLS = 24


def load_teal(path: str, shim: str | None):
    if shim:
        sys.path.insert(0, os.path.abspath(shim))
    spec = importlib.util.spec_from_file_location("teal_sparse_gemv", os.path.join(path, "kernels", "sparse_gemv.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def teal_config_call(teal, x3, w, t, cfg):
    """TEAL's kernel at one of its configs (its pre-hook zeroes y: done here)."""
    n, z = w.shape
    y = torch.zeros(1, 1, n, device=x3.device, dtype=torch.float16)
    bn, bm = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_M"]
    teal.splitk_sparse_gemv_kernel.fn[(triton.cdiv(n, bn), triton.cdiv(z, bm))](
        y, w, x3, t, n, z, n // 16, z // 16, 1, 0, BLOCK_N=bn, BLOCK_M=bm,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers.teal_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--teal", default=None, help="TEAL's repository (without it: ours and cuBLAS only)")
    p.add_argument("--shim", default=None, help="folder with a stand-in msgspec.py for TEAL's imports")
    p.add_argument("--teal-best", action="store_true", help="also time every TEAL config in this harness")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sparsities", nargs="+", type=float, default=SPARSITIES)
    p.add_argument("--max-seconds", type=float, default=400)
    p.add_argument("--families", nargs="*", default=None, choices=["compact", "predicated", "elect"],
                   help="also time each of our kernel families alone (columns <family>_us, <family>_x)")
    a = p.parse_args(argv)
    from actsparse.kernels.triton import sparse_gemv as sg

    teal = load_teal(a.teal, a.shim) if a.teal else None
    t0 = time.time()
    bw = copy_bandwidth()
    res = result(command_line("benchmarks.peers.teal_kernels", argv), [], copy_bandwidth_TBps=bw / 1e12,
                 timing="CUDA graph of back-to-back calls over >= 240 MB of weight copies, 4 input sets, "
                        "median replay / calls; speedups over cuBLAS in the same dtype")
    log(f"{res['gpu']}: copy {bw / 1e12:.2f} TB/s")
    for name in a.shapes:
        K, N = SHAPES[name]
        torch.manual_seed(0)
        nc = weight_copies(K * N * 2)
        calls = max(MIN_CALLS, nc)
        w32 = [torch.randn(N, K, device="cuda") * K ** -0.5 for _ in range(nc)]
        wb, wh = [w.to(torch.bfloat16) for w in w32], [w.to(torch.float16) for w in w32]
        wbi, whi = [w.t().contiguous().t() for w in wb], [w.t().contiguous().t() for w in wh]
        del w32
        xs32 = [torch.randn(1, K, device="cuda") for _ in range(N_SETS)]
        xb, xh = [x.to(torch.bfloat16) for x in xs32], [x.to(torch.float16) for x in xs32]
        xh3 = [x.view(1, 1, K) for x in xh]
        dense_b = bench_calls([lambda i=i: F.linear(xb[i % N_SETS], wb[i % nc]) for i in range(calls)])
        dense_h = bench_calls([lambda i=i: F.linear(xh[i % N_SETS], wh[i % nc]) for i in range(calls)])
        log(f"{name}: cuBLAS bf16 {dense_b:.1f} us ({K * N * 2 / dense_b / 1e3:.0f} GB/s), fp16 {dense_h:.1f} us")
        for s in a.sparsities:
            if time.time() - t0 > a.max_seconds:
                res.setdefault("skipped", []).append(f"{name} s={s}")
                continue
            t = threshold_for(s)
            ref_b = masked_ref(xb[0].float(), t) @ wb[0].float().t()
            ref_h = masked_ref(xh[0].float(), t) @ wh[0].float().t()
            row = dict(variant="kernel", batch=1, sparsity=s, shape=name, K=K, N=N, calls=calls, weight_copies=nc,
                       ideal_x=1 / (1 - s), dense_bf16_us=dense_b, dense_fp16_us=dense_h,
                       measured_sparsity=float(sum((x.abs() <= t).float().mean() for x in xb) / N_SETS))
            row["ours_err"] = rel_err(sg.launch_sparse_linear(xb[0], [wbi[0]], [None], [t], sparsity_hint=s)[0], ref_b)
            row["ours_fp16_err"] = rel_err(sg.launch_sparse_linear(xh[0], [whi[0]], [None], [t], sparsity_hint=s)[0],
                                           ref_h)
            row["ours_us"] = bench_calls([lambda i=i: sg.launch_sparse_linear(
                xb[i % N_SETS], [wbi[i % nc]], [None], [t], sparsity_hint=s)[0] for i in range(calls)])
            row["ours_fp16_us"] = bench_calls([lambda i=i: sg.launch_sparse_linear(
                xh[i % N_SETS], [whi[i % nc]], [None], [t], sparsity_hint=s)[0] for i in range(calls)])
            row["ours_x"] = dense_b / row["ours_us"]
            row["ours_fp16_x"] = dense_h / row["ours_fp16_us"]
            sg.launch_sparse_linear(xb[0], [wbi[0]], [None], [t], sparsity_hint=s)
            row["ours_family"], row["family_times_ms"] = sg.last_family(), sg.last_family_times()
            for fam in (a.families or []):  # each family alone, autotuned within itself
                with sg.forced_family(fam):
                    row[f"{fam}_err"] = rel_err(sg.launch_sparse_linear(xb[0], [wbi[0]], [None], [t],
                                                                        sparsity_hint=s)[0], ref_b)
                    row[f"{fam}_us"] = bench_calls([lambda i=i: sg.launch_sparse_linear(
                        xb[i % N_SETS], [wbi[i % nc]], [None], [t], sparsity_hint=s)[0] for i in range(calls)])
                    row[f"{fam}_fp16_us"] = bench_calls([lambda i=i: sg.launch_sparse_linear(
                        xh[i % N_SETS], [whi[i % nc]], [None], [t], sparsity_hint=s)[0] for i in range(calls)])
                row[f"{fam}_x"] = dense_b / row[f"{fam}_us"]
                row[f"{fam}_fp16_x"] = dense_h / row[f"{fam}_fp16_us"]
            if teal is not None:
                teal.splitk_sparse_gemv_kernel.cache.clear()  # retune TEAL for this sparsity
                row["teal_err"] = rel_err(teal.splitk_sparse_gemv(xh3[0], whi[0], t, 0), ref_h)
                row["teal_us"] = bench_calls([lambda i=i: teal.splitk_sparse_gemv(xh3[i % N_SETS], whi[i % nc], t, 0)
                                              for i in range(calls)])
                row["teal_x"] = dense_h / row["teal_us"]
                if a.teal_best:
                    best = min(((bench_calls([lambda i=i: teal_config_call(teal, xh3[i % N_SETS], whi[i % nc], t, c)
                                              for i in range(calls)], rep=25), j) for j, c in enumerate(teal.configs)))
                    row["teal_best_us"], row["teal_best_x"] = best[0], dense_h / best[0]
            row["tok_s"], row["vs_dense"] = None, row["ours_x"]
            res["rows"].append(row)
            write_json(a.out, res)
            log(f"  s={s:.2f} ours {row['ours_us']:6.1f}us x{row['ours_x']:.2f} (fp16 x{row['ours_fp16_x']:.2f}, "
                f"{row['ours_family']})"
                + "".join(f" | {f} x{row[f + '_x']:.2f}" for f in (a.families or []))
                + (f" | teal x{row['teal_x']:.2f}" + (f" best x{row['teal_best_x']:.2f}" if 'teal_best_x' in row else "")
                   if teal is not None else "")
                + f" | ideal {row['ideal_x']:.2f} | err {row['ours_err']:.1e}")
        del wb, wh, wbi, whi
        torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t0
    write_json(a.out, res)
    log(table(res["rows"]))
    return 0


def table(rows: list[dict]) -> str:
    """Markdown: speedup over cuBLAS per shape and sparsity, ours (chosen family) / TEAL / ideal."""
    sps = sorted({r["sparsity"] for r in rows})
    out = ["| shape, ours (family) / TEAL / ideal | " + " | ".join(f"{s:.0%}" for s in sps) + " |",
           "|---|" + "---|" * len(sps)]
    for name in dict.fromkeys(r["shape"] for r in rows):
        by = {r["sparsity"]: r for r in rows if r["shape"] == name}
        cells = []
        for s in sps:
            r = by.get(s)
            if r is None:
                cells.append("-")
                continue
            teal = f"{r['teal_x']:.2f}" if r.get("teal_x") else "-"
            fam = (r.get("ours_family") or "?")[0]
            cells.append(f"{r['ours_x']:.2f} ({fam}) / {teal} / {r['ideal_x']:.2f}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
