"""GPU sweep of the batch-1 sparse kernel: which launch configuration and which launch mode
(programmatic dependent launch or not) is fastest where the kernel runs, inside a CUDA graph.

Why: the autotuner ranks configurations by `do_bench` of single launches, which adds about
9 us of launch overhead to every candidate; the backend runs the kernels back to back inside a
CUDA graph. This script times every candidate the way the decode step runs it, and checks each
result against the fp32 reference after the graph replays.

Three parts, one call:

1. ``sweep``: every candidate configuration (the autotuner's list plus software-pipelined,
   larger-tile and evict-first variants) at batch 1 on the Llama-3-8B shapes, 25% and 50%
   sparsity, as a graph of back-to-back calls (as in ``benchmarks.kernels``).
2. ``pdl``: the best configurations again with programmatic dependent launch (PDL=1: wait at
   the start, release the next kernel at once; PDL=2: release it after the weight loop), both
   back to back and with a small producer kernel (``x * 1.0``, standing in for the RMSNorm or
   the activation that writes the sparse kernel's input) between the calls.
3. ``fused``: the best configurations on the shared-input launches the backend emits
   (gate+up: two outputs of 14336; q+k+v: 4096+1024+1024).
4. ``dot``: the tensor-core path (rows padded to 16, one ``tl.dot`` per step) with and without
   Triton's software pipelining (``num_stages``; the weight loads feed a dot, so the pipeliner
   can stage them through shared memory), at 1 (padded) to 16 rows, 50% sparsity.
5. ``probe``: where the fixed cost of a call goes. The kernel's timing probes (``PROBE``,
   wrong results by design) drop one stage at a time: 4 an empty grid, 3 the input load and
   compaction only, 2 that plus the split-K fix-up (no weight loop), 1 everything but the
   fix-up; 0 is the real kernel.
6. ``single``: one chunk per program covering all of K (no split-K, so no fix-up: the sums are
   stored directly) against the autotuned split-K kernel, where K is 4096.

    PYTHONPATH=. python3 benchmarks/studies/gpu_kernel_variants.py --out $OUT/kernel_variants.json
    python3 benchmarks/studies/gpu_kernel_variants.py --render benchmarks/results/kernel_variants_h100.json \\
        benchmarks/results/kernel_graphtune_h100.json benchmarks/results/kernel_probe_h100.json \\
        benchmarks/results/kernel_single_h100.json benchmarks/results/kernel_head_h100.json benchmarks/results/kernel_dot_h100.json \\
        --md benchmarks/results/kernel_variants_h100.md   # no GPU needed
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

from benchmarks.harness import masked_ref
import torch.nn.functional as F

from benchmarks.harness import bench_calls, graph_calls, rel_err, threshold_for, weight_copies

SHAPES = {"gate_up": (4096, [14336]), "down": (14336, [4096]), "q_o": (4096, [4096])}
FUSED = {"gate+up": (4096, [14336, 14336]), "q+k+v": (4096, [4096, 1024, 1024])}


def candidates():
    """The autotuner's list, then variants around its winners."""
    from actsparse.kernels.triton import sparse_gemv as sg

    out = []
    for c in sg.CONFIGS_M1:
        d = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        out.append(d)

    def add(chunk, bk, bn, w, st=1, pf=False, ev=""):
        d = dict(COMPACT=True, CHUNK=chunk, BLOCK_K=bk, BLOCK_N=bn, PREFETCH=pf, num_warps=w, num_stages=st)
        if ev:
            d["W_EVICT"] = ev
        if d not in out:
            out.append(d)

    for st in (2, 3, 4):  # let Triton's pipeliner stage the weight loads (no hand prefetch)
        add(512, 32, 256, 2, st)
        add(512, 16, 512, 4, st)
        add(256, 32, 256, 2, st)
    for chunk, bk, bn, w in ((512, 64, 256, 4), (1024, 32, 256, 2), (512, 32, 512, 4), (256, 64, 256, 4),
                             (512, 32, 128, 2), (1024, 64, 256, 4)):
        add(chunk, bk, bn, w)
        add(chunk, bk, bn, w, pf=True)
    add(512, 32, 256, 2, ev="evict_first")
    add(512, 16, 512, 4, ev="evict_first")
    return out


def short(cfg) -> str:
    s = f"{'c' if cfg['COMPACT'] else 'p'}{cfg['CHUNK']}/{cfg['BLOCK_K']}/{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"
    s += "" if cfg.get("PREFETCH", True) else "n"
    s += "e" if cfg.get("W_EVICT") else ""
    s += "h" if cfg.get("HEAD") else ""
    s += f"+pdl{cfg['PDL']}" if cfg.get("PDL") else ""
    return s


class Case:
    """Weights (enough copies to miss L2), inputs and the fp32 reference for one shape."""

    def __init__(self, K, ns, sparsity, rows=1):
        torch.manual_seed(0)
        self.K, self.ns, self.s = K, ns, sparsity
        nbytes = K * sum(ns) * 2
        self.copies = weight_copies(nbytes)
        self.ws = [[(torch.randn(n, K, device="cuda") * 0.02).to(torch.bfloat16).t().contiguous().t() for n in ns]
                   for _ in range(self.copies)]
        self.xs = [torch.randn(rows, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        self.t = threshold_for(sparsity)
        self.calls = max(24, self.copies)

    def refs(self, i):
        from actsparse.kernels.triton import sparse_gemv as sg

        xm = masked_ref(self.xs[i % 4].float(), self.t)
        return [xm @ w.float().t() for w in self.ws[i % self.copies]]


def time_config(case: Case, cfg, producer=False):
    """(us per call, max relative error after replays) of one pinned config in a graph."""
    from actsparse.kernels.triton import sparse_gemv as sg

    launch = dict(cfg)
    if launch.get("PDL"):
        launch["launch_pdl"] = True
    n = len(case.ns)
    thr = [case.t] * n
    if producer:  # a small kernel writes each call's input, as the RMSNorm or the activation does
        bufs = [torch.empty_like(case.xs[0]) for _ in range(case.calls)]

        def call(i):
            torch.mul(case.xs[i % 4], 1.0, out=bufs[i])
            return sg.launch_sparse_linear(bufs[i], case.ws[i % case.copies], [None] * n, thr, config=launch)
    else:
        def call(i):
            return sg.launch_sparse_linear(case.xs[i % 4], case.ws[i % case.copies], [None] * n, thr, config=launch)

    fns = [lambda i=i: call(i) for i in range(case.calls)]
    us = bench_calls(fns)
    g, outs = graph_calls(fns)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    err = max(rel_err(y, r) for i in (0, 1, 5) for y, r in zip(outs[i], case.refs(i)))
    del g, outs
    return us, err


def dense_us(case: Case) -> float:
    wr = [[w.contiguous() for w in ws] for ws in case.ws]  # row-major, as the dense model stores them
    us = bench_calls([lambda i=i: [F.linear(case.xs[i % 4], w) for w in wr[i % case.copies]]
                      for i in range(case.calls)])
    del wr
    return us


def autotuned_us(case: Case) -> tuple[float, str]:
    from actsparse.kernels.triton import sparse_gemv as sg

    n = len(case.ns)
    fns = [lambda i=i: sg.launch_sparse_linear(case.xs[i % 4], case.ws[i % case.copies], [None] * n,
                                               [case.t] * n, sparsity_hint=case.s) for i in range(case.calls)]
    us = bench_calls(fns)
    best = sg._tuned_kernel(1).best_config
    return us, short(dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages))


def dot_configs():
    from actsparse.kernels.triton import sparse_gemv as sg

    out = []
    for c in sg.CONFIGS_DOT:
        out.append(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
        for st in (1, 3, 4):
            d = dict(c.kwargs, PREFETCH=False, num_warps=c.num_warps, num_stages=st)
            if d not in out:
                out.append(d)
    return out


def dot_part(rows_list, save, res) -> list[dict]:
    """The tl.dot path with and without pipelining, at several row counts (M=1 padded to 16)."""
    out = []
    for name in ("gate_up", "down"):
        K, ns = SHAPES[name]
        for rows in rows_list:
            case = Case(K, ns, 0.5, rows=rows)
            d = dense_us(case)
            row = {"shape": name, "K": K, "N": ns, "rows": rows, "sparsity": 0.5, "dense_us": d, "configs": {}}
            for cfg in dot_configs():
                c = dict(cfg, M_PAD=16)
                try:
                    us, err = time_config(case, c)
                except Exception as e:
                    row["configs"][short(cfg)] = {"error": repr(e)[:200]}
                    continue
                row["configs"][short(cfg)] = {"us": us, "err": err}
            ok = sorted((v["us"], k) for k, v in row["configs"].items() if "us" in v)
            print(f"dot {name:8s} M={rows:2d} dense {d:6.1f} best " + ", ".join(f"{k} {u:.1f}" for u, k in ok[:4]),
                  flush=True)
            out.append(row)
            res["dot"] = out
            save()
            del case
            torch.cuda.empty_cache()
    return out


TEAL_KEY = {"gate_up": "gate_up 4096->14336", "down": "down 14336->4096", "q_o": "q_o 4096->4096"}


def markdown(results: list[dict]) -> str:
    """Tables from one or more result files of this script."""
    from benchmarks.kernels import TEAL_H100, TEAL_SPARSITIES

    r0 = results[0]
    lines = [f"# Batch-1 sparse kernel: configurations and launch modes on {r0['device']}", "",
             "Each time is the median per call of a CUDA graph of back-to-back calls rotating over weight "
             "copies that miss L2 (as `benchmarks.kernels` times them); every result is checked "
             "against the fp32 reference after the replays (all within 1.7e-3, as dense bf16). "
             "Config names: `c`CHUNK/BLOCK_K/BLOCK_N, `w` warps, `s` num_stages, `n` no hand prefetch, "
             "`e` evict-first weight loads, `h` speculative head.", ""]
    for r in results:
        lines.append(f"`{r['command']}` (torch {r['torch']}, {r.get('wall_s', 0):.0f} s)  ")
    lines.append("")
    sweep = [dict(row, tuner=r.get("autotune_bench", "")) for r in results for row in r.get("sweep", [])]
    heads = [row for row in sweep if any(k.endswith("h") for k in row["configs"])]
    sweep = [row for row in sweep if row not in heads]
    if sweep:
        lines += ["## Configurations (batch 1)", "",
                  "The autotuner timed its candidates with `do_bench` (single launches) in the first run, "
                  "and from a CUDA graph with L2 flushed before each call in the second "
                  "(`actsparse/kernels/triton/_runtime.py`, `graph_bench`).", "",
                  "| autotuner timing | shape | s | dense us | autotuned us (config) | best in graph us (config) | "
                  "best speedup | TEAL H100 | ideal | num_stages 1..4 spread us |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in sweep:
            ok = {k: v["us"] for k, v in row["configs"].items() if "us" in v}
            best = min(ok, key=ok.get)
            staged = [ok[k] for k in (re.sub(r"s\d", f"s{n}", best, count=1) for n in (1, 2, 3, 4)) if k in ok]
            spread = f"{max(staged) - min(staged):.1f}" if len(staged) > 1 else "-"
            teal = TEAL_H100[TEAL_KEY[row["shape"]]][TEAL_SPARSITIES.index(row["sparsity"])]
            lines.append(f"| {row['tuner']} | {row['shape']} | {row['sparsity']:.2f} | {row['dense_us']:.1f} | "
                         f"{row['autotuned_us']:.1f} ({row['autotuned_config']}) | {ok[best]:.1f} ({best}) | "
                         f"{row['dense_us'] / ok[best]:.2f} | {teal:.2f} | {1 / (1 - row['sparsity']):.2f} | "
                         f"{spread} |")
        lines.append("")
    if heads:
        lines += ["## Speculative head (measured, then removed from the kernel)", "",
                  "`h`: each program first requested the weight rows of its chunk's first BLOCK_K channels, "
                  "before x was loaded and compacted, and left those channels out of the list; the idea was to "
                  "fill the memory-idle prologue. It was slower everywhere, most at 90% where most of those "
                  "rows are wasted; our reading is that the early weight requests delay the x load the "
                  "compaction waits for. The variant is in the history (commit 119f326), not in the kernel.", "",
                  "| shape | s | best without head us (config) | best with head us (config) |", "|---|---|---|---|"]
        for row in heads:
            ok = {k: v["us"] for k, v in row["configs"].items() if "us" in v}
            plain = min((k for k in ok if not k.endswith("h")), key=ok.get)
            head = min((k for k in ok if k.endswith("h")), key=ok.get)
            lines.append(f"| {row['shape']} | {row['sparsity']:.2f} | {ok[plain]:.1f} ({plain}) | {ok[head]:.1f} ({head}) |")
        lines.append("")
    pdl = [row for r in results for row in r.get("pdl", []) if "us" in row]
    if pdl:
        lines += ["## Programmatic dependent launch (batch 1, 50%)", "",
                  "PDL 0: plain launch; 1: wait at the start, release the next kernel at once; 2: wait at the "
                  "start, release it after the weight loop. `producer`: a small elementwise kernel writes each "
                  "call's input, as the RMSNorm or the activation does in a model.", "",
                  "| shape | config | producer | PDL 0 us | PDL 1 us | PDL 2 us |", "|---|---|---|---|---|---|"]
        keyed = {}
        for row in pdl:
            base, _, mode = row["config"].partition("+pdl")
            keyed.setdefault((row["shape"], base, row["producer"]), {})[int(mode or 0)] = row["us"]
        for (shape, base, prod), v in keyed.items():
            cells = " | ".join(f"{v[m]:.1f}" if m in v else "" for m in (0, 1, 2))
            lines.append(f"| {shape} | {base} | {prod} | {cells} |")
        lines.append("")
    fused = [row for r in results for row in r.get("fused", [])]
    if fused:
        lines += ["## Shared-input launches (batch 1, 50%)", "",
                  "Dense: one cuBLAS call per output (the dense model's separate projections).", "",
                  "| launch | config | us | dense us | speedup | autotuned us (config) |", "|---|---|---|---|---|---|"]
        for row in fused:
            lines.append(f"| {row['shape']} | {row['config']} | {row['us']:.1f} | {row['dense_us']:.1f} | "
                         f"{row['dense_us'] / row['us']:.2f} | {row['autotuned_us']:.1f} ({row['autotuned_config']}) |")
        lines.append("")
    probe = [row for r in results for row in r.get("probe", [])]
    if probe:
        lines += ["## Where the time of one call goes (batch 1)", "",
                  "Timing probes compiled into the kernel remove one stage at a time (results wrong by "
                  "design): an empty grid; the input load and compaction only; everything but the split-K "
                  "fix-up. `weights at copy rate`: the active weight bytes over the measured copy bandwidth "
                  "(its reads plus writes per second; cuBLAS reads the dense weights at 0.94 of it).", "",
                  "| shape | s | dense us | kernel us | empty grid | x load + compaction | weight loop + "
                  "partial adds | split-K fix-up | weights at copy rate |", "|---|---|---|---|---|---|---|---|---|"]
        for row in probe:
            pu = {int(k): v for k, v in row["probe_us"].items()}
            parts = row["parts_us"]
            lines.append(f"| {row['shape']} | {row['sparsity']:.1f} | {row['dense_us']:.1f} | {pu[0]:.1f} | "
                         f"{parts['launch_and_empty_grid']:.1f} | {parts['x_load_and_compaction']:.1f} | "
                         f"{parts['weight_loop_and_partial_adds']:.1f} | {parts['split_k_fixup']:.1f} | "
                         f"{row['weight_read_us_at_copy_rate']:.1f} |")
        lines.append("")
    single = [row for r in results for row in r.get("single", [])]
    if single:
        lines += ["## One chunk per program (no split-K) against split-K", "",
                  "A program reads its block of outputs over all of K = 4096 and stores the sums directly "
                  "(no fix-up); fewer programs, each walking a longer list.", "",
                  "| shape | s | dense us | split-K, autotuned us (config) | one chunk, best us (config) |",
                  "|---|---|---|---|---|"]
        for row in single:
            ok = {k: v["us"] for k, v in row["configs"].items() if "us" in v}
            best = min(ok, key=ok.get)
            lines.append(f"| {row['shape']} | {row['sparsity']:.2f} | {row['dense_us']:.1f} | "
                         f"{row['autotuned_us']:.1f} ({row['autotuned_config']}) | {ok[best]:.1f} ({best}) |")
        lines.append("")
    dot = [row for r in results for row in r.get("dot", [])]
    if dot:
        lines += ["## Tensor-core path with and without software pipelining (50%)", "",
                  "Rows padded to 16, one `tl.dot` per step; at M=1 the FMA path is the one the backend uses "
                  "(table above). `s3`/`s4`: Triton's pipeliner asked to stage the loads.", "",
                  "| shape | rows | dense us | best us (config) | same config, num_stages 1 / 3 / 4 us |",
                  "|---|---|---|---|---|"]
        for row in dot:
            ok = {k: v["us"] for k, v in row["configs"].items() if "us" in v}
            best = min(ok, key=ok.get)
            names = [re.sub(r"s\d", f"s{n}", best, count=1) for n in (1, 3, 4)]
            st = " / ".join(f"{ok[k]:.1f}" if k in ok else "-" for k in names)
            lines.append(f"| {row['shape']} | {row['rows']} | {row['dense_us']:.1f} | {ok[best]:.1f} ({best}) | {st} |")
        lines.append("")
    return "\n".join(lines)


PROBE_CONFIGS = {  # the autotuner's picks at 50% (benchmarks/results/kernels_h100.md)
    "gate_up": dict(COMPACT=True, CHUNK=512, BLOCK_K=32, BLOCK_N=256, PREFETCH=False, num_warps=2, num_stages=1),
    "down": dict(COMPACT=True, CHUNK=512, BLOCK_K=32, BLOCK_N=256, PREFETCH=False, num_warps=2, num_stages=1),
    "q_o": dict(COMPACT=True, CHUNK=256, BLOCK_K=32, BLOCK_N=256, PREFETCH=False, num_warps=2, num_stages=1),
}


def probe_part(save, res) -> list[dict]:
    """Time the kernel with stages removed; restore the zeroed workspace afterwards."""
    from benchmarks.harness import copy_bandwidth
    from actsparse.kernels.triton import _runtime as rt

    bw = copy_bandwidth()  # bytes moved per second (a copy's reads plus writes; a pure read streams as fast)
    out = []
    for name, cfg in PROBE_CONFIGS.items():
        K, ns = SHAPES[name]
        for s in (0.5, 0.9):
            case = Case(K, ns, s)
            row = {"shape": name, "sparsity": s, "config": short(cfg), "dense_us": dense_us(case),
                   "read_bw_TBps": bw / 1e12,
                   "weight_read_us_at_copy_rate": K * sum(ns) * 2 * (1 - s) / bw * 1e6, "probe_us": {}}
            for probe in (4, 3, 2, 1, 0):
                us, err = time_config(case, dict(cfg, PROBE=probe))
                row["probe_us"][probe] = us
                if probe == 0:
                    row["err"] = err
                for key, buf in rt._BUFFERS.items():  # probe 1 leaves partial sums behind
                    if key[0] in ("ws", "cnt"):
                        buf.zero_()
            pu = row["probe_us"]
            row["parts_us"] = {"launch_and_empty_grid": pu[4], "x_load_and_compaction": pu[3] - pu[4],
                               "split_k_fixup": pu[0] - pu[1], "weight_loop_and_partial_adds": pu[1] - pu[3]}
            print(f"probe {name:8s} s={s:.1f} dense {row['dense_us']:.1f} " +
                  " ".join(f"P{k}={v:.1f}" for k, v in pu.items()) +
                  f" weights at copy rate {row['weight_read_us_at_copy_rate']:.1f}", flush=True)
            out.append(row)
            res["probe"] = out
            save()
            del case
            torch.cuda.empty_cache()
    return out


def single_configs():
    out = []
    for bk, bn, w, pf in ((32, 64, 2, False), (32, 128, 2, False), (64, 128, 4, False), (32, 128, 4, True),
                          (64, 64, 2, False), (16, 128, 2, True), (64, 256, 4, False), (32, 64, 4, True),
                          (128, 64, 4, False)):
        out.append(dict(COMPACT=True, CHUNK=4096, BLOCK_K=bk, BLOCK_N=bn, PREFETCH=pf, num_warps=w, num_stages=1))
    return out


def single_part(save, res) -> list[dict]:
    """Chunk = K (4096): each program reads its output block's weights over all of K."""
    shapes = {"gate_up": SHAPES["gate_up"], "q_o": SHAPES["q_o"], **FUSED}
    out = []
    for name, (K, ns) in shapes.items():
        for s in (0.25, 0.5, 0.9):
            case = Case(K, ns, s)
            d = dense_us(case)
            auto, auto_cfg = autotuned_us(case)
            row = {"shape": name, "K": K, "N": ns, "sparsity": s, "dense_us": d, "autotuned_us": auto,
                   "autotuned_config": auto_cfg, "configs": {}}
            for cfg in single_configs():
                try:
                    us, err = time_config(case, cfg)
                except Exception as e:
                    row["configs"][short(cfg)] = {"error": repr(e)[:200]}
                    continue
                row["configs"][short(cfg)] = {"us": us, "err": err}
            ok = sorted((v["us"], k) for k, v in row["configs"].items() if "us" in v)
            print(f"single {name:8s} s={s:.2f} dense {d:6.1f} split-K autotuned {auto:6.1f} ({auto_cfg}) one chunk: "
                  + ", ".join(f"{k} {u:.1f}" for u, k in ok[:3]), flush=True)
            out.append(row)
            res["single"] = out
            save()
            del case
            torch.cuda.empty_cache()
    return out


def main() -> int:
    if "--render" in sys.argv:
        p = argparse.ArgumentParser()
        p.add_argument("--render", nargs="+", required=True)
        p.add_argument("--md", required=True)
        args = p.parse_args()
        results = [json.load(open(f)) for f in args.render]
        with open(args.md, "w") as f:
            f.write(markdown(results))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--top", type=int, default=3, help="configs carried into the PDL and fused parts")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--parts", nargs="+", default=["sweep", "pdl", "fused", "dot"],
                   choices=["sweep", "pdl", "fused", "dot", "probe", "single"])
    p.add_argument("--dot-rows", type=int, nargs="+", default=[1, 2, 4, 16])
    args = p.parse_args()
    from actsparse.kernels.triton import sparse_gemv as sg

    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "pdl_available": sg.PDL_AVAILABLE,
           "autotune_bench": "CUDA graph, L2 flushed",
           "command": "PYTHONPATH=. python3 benchmarks/studies/gpu_kernel_variants.py " + " ".join(sys.argv[1:]),
           "sweep": [], "pdl": [], "fused": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    def late(frac):
        return time.time() - t0 > frac * args.budget_s

    if "dot" in args.parts:
        res["dot"] = dot_part(args.dot_rows, save, res)
    if "probe" in args.parts:
        res["probe"] = probe_part(save, res)
    if "single" in args.parts:
        res["single"] = single_part(save, res)
    cands = candidates()
    score: dict[str, list[float]] = {}  # config -> speedups over all sweep cases
    by_name = {short(c): c for c in cands}
    for name, (K, ns) in (SHAPES.items() if "sweep" in args.parts else []):
        for s in args.sparsities:
            case = Case(K, ns, s)
            d = dense_us(case)
            auto, auto_cfg = autotuned_us(case)
            row = {"shape": name, "K": K, "N": ns, "sparsity": s, "dense_us": d, "autotuned_us": auto,
                   "autotuned_config": auto_cfg, "configs": {}}
            for cfg in cands:
                if late(0.55):
                    break
                try:
                    us, err = time_config(case, cfg)
                except Exception as e:  # a candidate that does not compile is reported, not fatal
                    row["configs"][short(cfg)] = {"error": repr(e)[:200]}
                    continue
                row["configs"][short(cfg)] = {"us": us, "err": err}
                score.setdefault(short(cfg), []).append(d / us)
            best = min((v["us"], k) for k, v in row["configs"].items() if "us" in v)
            print(f"{name:8s} s={s:.2f} dense {d:6.1f} autotuned {auto:6.1f} ({d / auto:.2f}x, {auto_cfg}) "
                  f"best {best[0]:6.1f} ({d / best[0]:.2f}x, {best[1]})", flush=True)
            res["sweep"].append(row)
            save()
            del case
            torch.cuda.empty_cache()

    if not score:
        res["wall_s"] = time.time() - t0
        save()
        return 0
    n_cases = max(len(v) for v in score.values())
    ranked = sorted((sum(v) / len(v), k) for k, v in score.items() if len(v) == n_cases)[::-1]
    res["ranking"] = [{"config": k, "mean_speedup": m} for m, k in ranked]
    top = [by_name[k] for _, k in ranked[: args.top]]
    print("ranking (mean speedup over the sweep cases):", ", ".join(f"{k} {m:.3f}" for m, k in ranked[:8]))
    save()

    if sg.PDL_AVAILABLE and "pdl" in args.parts:
        for name, (K, ns) in SHAPES.items():
            case = Case(K, ns, 0.5)
            d = dense_us(case)
            for cfg in top:
                for producer in (False, True):
                    for mode in (0, 1, 2):
                        if late(0.8):
                            break
                        c = dict(cfg, PDL=mode)
                        try:
                            us, err = time_config(case, c, producer=producer)
                        except Exception as e:
                            res["pdl"].append({"shape": name, "config": short(c), "producer": producer,
                                               "error": repr(e)[:300]})
                            continue
                        res["pdl"].append({"shape": name, "sparsity": 0.5, "config": short(c), "producer": producer,
                                           "dense_us": d, "us": us, "err": err})
                        print(f"pdl {name:8s} {short(c):28s} producer={producer!s:5s} {us:6.1f}us "
                              f"({d / us:.2f}x) err {err:.1e}", flush=True)
            save()
            del case
            torch.cuda.empty_cache()

    for name, (K, ns) in (FUSED.items() if "fused" in args.parts else []):
        case = Case(K, ns, 0.5)
        d = dense_us(case)
        auto, auto_cfg = autotuned_us(case)
        for cfg in top:
            if late(0.95):
                break
            us, err = time_config(case, cfg)
            res["fused"].append({"shape": name, "sparsity": 0.5, "config": short(cfg), "dense_us": d, "us": us,
                                 "err": err, "autotuned_us": auto, "autotuned_config": auto_cfg})
            print(f"fused {name:8s} {short(cfg):28s} {us:6.1f}us ({d / us:.2f}x) autotuned {auto:6.1f} "
                  f"({auto_cfg}) err {err:.1e}", flush=True)
        save()
        del case
        torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t0
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
