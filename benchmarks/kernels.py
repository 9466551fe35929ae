"""GPU kernel benchmark: input-sparse linear and CATS gated MLP against dense cuBLAS.

    PYTHONPATH=. python3 -m benchmarks.kernels --out benchmarks/results/kernels_h100.json

At Llama-3-8B shapes in bf16, for each batch and sparsity: correctness first (relative error
against an fp32 reference, next to the error of dense bf16 `F.linear` on the same masked
input), then timing. Every timed call is a CUDA graph replay (so launch overhead from Python is
out, and graph capture of the wrappers is exercised), rotating over several input sets, with
`triton.testing.do_bench` (median) over a graph of many back-to-back calls that rotate over
weight copies so that L2 holds none of them (see `bench_calls`). Writes JSON (+ PNG plot, markdown
table next to it) and prints a compact table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from actsparse.ops.dense import masked_linears
from actsparse.ops.reference import gated_mlp_reference
from benchmarks.harness import (ERR_OK, N_SETS, bench_calls, bench_graphs, copy_bandwidth, graph_calls, graph_of,
                                masked_ref, rel_err, threshold_for, weight_copies)

SHAPES = {  # name: (K in, N out), Llama-3-8B
    "gate_up 4096->14336": (4096, 14336),
    "down 14336->4096": (14336, 4096),
    "q_o 4096->4096": (4096, 4096),
    "k_v 4096->1024": (4096, 1024),
}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
BATCHES = [1, 2, 4, 8, 16]
# TEAL's own Triton kernel on an H100 (fp16, batch 1), speedup over dense fp16 GEMV: ANCHORS.md
TEAL_H100 = {
    "down 14336->4096": [1.13, 1.40, 1.63, 1.82, 1.98, 2.17, 2.29, 2.39],
    "gate_up 4096->14336": [1.10, 1.36, 1.60, 1.78, 1.96, 2.12, 2.24, 2.37],
    "q_o 4096->4096": [1.06, 1.21, 0.52, 0.38, 1.54, 0.24, 1.76, 1.81],
    "k_v 4096->1024": [0.98, 1.05, 1.06, 1.13, 1.16, 0.32, 1.25, 1.32],
}
TEAL_SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# A TEAL-style config of our kernel (predicated loads, no compaction), timed at batch 1.
TEAL_LIKE = dict(COMPACT=False, CHUNK=32, BLOCK_K=32, BLOCK_N=256, num_warps=2)
CALLS_PER_GRAPH = 24  # layer calls per timed CUDA graph (see bench_calls)
CATS_CALLS = 8


def _short(cfg) -> str:
    """A config as a short string: c(ompact)/p(redicated), chunk, block_k, block_n, warps."""
    if cfg is None:
        return "-"
    kw = cfg.kwargs
    if "TILES" in kw:  # the predicated family: t(iles) BLOCK_K x TILES / BLOCK_N, e: evict-first weights, a: always add
        return (f"t{kw['BLOCK_K']}x{kw['TILES']}/{kw['BLOCK_N']}w{cfg.num_warps}s{cfg.num_stages}"
                + ("e" if kw.get("W_EVICT") else "") + ("" if kw.get("SKIP_EMPTY", True) else "a"))
    if "CHUNK" in kw:
        return (f"{'c' if kw['COMPACT'] else 'p'}{kw['CHUNK']}/{kw['BLOCK_K']}/{kw['BLOCK_N']}"
                f"w{cfg.num_warps}s{cfg.num_stages}" + ("" if kw.get("PREFETCH", True) or not kw["COMPACT"] else "n"))
    return f"f{kw['BLOCK_F']}/{kw['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"


def union_density(xs, t) -> float:
    return float(sum((x.abs().float() > t).any(0).float().mean() for x in xs) / len(xs))


def bench_linear(rows, name, K, N, batches, sparsities, device_model, log, deadline):
    from actsparse.ops import cost_model
    from actsparse.kernels.triton import predicated_gemv as pg
    from actsparse.kernels.triton import sparse_gemv as sg

    torch.manual_seed(0)
    n_copies = weight_copies(K * N * 2)
    wr = [(torch.randn(N, K, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16) for _ in range(n_copies)]
    wi = [w.t().contiguous().t() for w in wr]  # input-major: the N weights of channel k are contiguous
    w, w_im, w32 = wr[0], wi[0], wr[0].float()
    calls = max(CALLS_PER_GRAPH, n_copies)
    for M in batches:
        xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(N_SETS)]
        x_of = lambda i: xs[i % N_SETS]  # noqa: E731
        # dense baselines: cuBLAS on the usual row-major weight, and the fallback path
        # (mask + F.linear on the input-major storage)
        t_dense = bench_calls([lambda i=i: F.linear(x_of(i), wr[i % n_copies]) for i in range(calls)])
        t_fallback = bench_calls([lambda i=i: masked_linears(x_of(i), [wi[i % n_copies]], [None], [0.5])
                                  for i in range(calls)])
        for s in sparsities:
            if time.time() > deadline:
                log(f"deadline reached, skipping {name} M={M} s={s}")
                return rows
            t = threshold_for(s)
            # correctness, eager
            y = sg.launch_sparse_linear(xs[0], [w_im], [None], [t], sparsity_hint=s)[0]
            ref = masked_ref(xs[0].float(), t) @ w32.t()
            err = rel_err(y, ref)
            family, family_ms = sg.last_family(), sg.last_family_times()
            dense_err = rel_err(F.linear(masked_ref(xs[0], t), w), ref)
            tuner = sg._tuned_kernel(sg.rows_pad(M))
            cfg = tuner.best_config
            timings = {_short(c): round(1e3 * v[0], 1) for c, v in getattr(tuner, "configs_timings", {}).items()}
            # timing, captured: `calls` launches in one graph, rotating inputs and weight copies
            fns = [lambda i=i: sg.launch_sparse_linear(x_of(i), [wi[i % n_copies]], [None], [t], sparsity_hint=s)[0]
                   for i in range(calls)]
            t_sparse = bench_calls(fns)
            g, outs = graph_calls(fns)
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            err_graph = rel_err(outs[0], ref)  # after many replays: workspace self-cleaning holds
            del g, outs
            with sg.forced_family("predicated"):  # the predicated family alone, autotuned within itself
                err_pred = rel_err(sg.launch_sparse_linear(xs[0], [w_im], [None], [t], sparsity_hint=s)[0], ref)
                t_pred = bench_calls([lambda i=i: sg.launch_sparse_linear(x_of(i), [wi[i % n_copies]], [None], [t],
                                                                          sparsity_hint=s)[0] for i in range(calls)])
            with sg.forced_family("compact"):
                t_compact = bench_calls([lambda i=i: sg.launch_sparse_linear(
                    x_of(i), [wi[i % n_copies]], [None], [t], sparsity_hint=s)[0] for i in range(calls)])
            pred_cfg = pg._tuned_kernel(sg.rows_pad(M)).best_config
            t_teal = None
            if M == 1:
                t_teal = bench_calls([lambda i=i: sg.launch_sparse_linear(x_of(i), [wi[i % n_copies]], [None], [t],
                                                                          config=TEAL_LIKE)[0] for i in range(calls)])
            u = union_density(xs, t)
            pred = cost_model.predict(M, K, N, s, 2, device=device_model)
            row = dict(shape=name, K=K, N=N, M=M, sparsity=s, threshold=t, union_measured=u,
                       union_independent=cost_model.union(M, s),
                       rel_err=err, rel_err_graph=err_graph, dense_bf16_rel_err=dense_err,
                       dense_us=t_dense, fallback_us=t_fallback, sparse_us=t_sparse, teal_like_us=t_teal,
                       family=family, family_times_ms=family_ms, compact_us=t_compact, predicated_us=t_pred,
                       predicated_rel_err=err_pred, predicated_config=_short(pred_cfg),
                       compact_x=t_dense / t_compact, predicated_x=t_dense / t_pred,
                       speedup=t_dense / t_sparse, ideal=1.0 / max(1.0 - s, 1e-9),
                       ideal_union=1.0 / max(u, 1e-9),
                       pred_speedup=pred["speedup"], pred_sparse_us=pred["sparse_s"] * 1e6,
                       pred_dense_us=pred["dense_s"] * 1e6,
                       prefer_sparse_pred=cost_model.prefer_sparse(M, K, N, s, 2, device=device_model),
                       wrapper_sparse=cost_model.prefer_sparse(M, K, N, s, 2, against="fallback"),
                       config=_short(cfg), config_timings_us=timings)
            row["frac_of_ideal"] = row["speedup"] / row["ideal_union"]
            rows.append(row)
            log(f"{name:22s} M={M:2d} s={s:.2f} dense {t_dense:7.1f}us sparse {t_sparse:7.1f}us "
                f"x{row['speedup']:5.2f} (ideal {row['ideal_union']:5.2f}, pred {pred['speedup']:5.2f}"
                + (f", teal-like x{t_dense / t_teal:5.2f}" if t_teal else "")
                + f") err {err:.1e} graph {err_graph:.1e} dense-bf16 {dense_err:.1e} {family}: "
                f"compact x{t_dense / t_compact:5.2f} {_short(cfg)}, predicated x{t_dense / t_pred:5.2f} "
                f"{_short(pred_cfg)} (err {err_pred:.1e})")
            if M == 1 or s in (0.0, 0.9):
                log("    tuning: " + " ".join(f"{k}={v}" for k, v in sorted(timings.items(), key=lambda kv: kv[1])))
    del wr, wi
    torch.cuda.empty_cache()
    return rows


def bench_cats(rows, d, f, batches, sparsities, device_model, log, deadline):
    from actsparse.ops import cost_model
    from actsparse.kernels.triton import gated_mlp as gm

    torch.manual_seed(1)
    mk = lambda r, c: (torch.randn(r, c, device="cuda") * 0.02).to(torch.bfloat16)  # noqa: E731
    wg, wu, wd = mk(f, d), mk(f, d), mk(d, f)
    wd_im = wd.t().contiguous().t()
    for M in batches:
        xs = [torch.randn(M, d, device="cuda", dtype=torch.bfloat16) for _ in range(N_SETS)]

        def dense(x):
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

        t_dense = bench_calls([lambda i=i: dense(xs[i % N_SETS]) for i in range(CATS_CALLS)])
        g_all = torch.cat([F.silu(x.float() @ wg.float().t()).abs().flatten() for x in xs])
        for s in sparsities:
            if time.time() > deadline:
                log(f"deadline reached, skipping CATS M={M} s={s}")
                return rows
            thr = float(torch.quantile(g_all[: 1 << 24].float(), s)) if s > 0 else 0.0
            y = gm.launch_gated_mlp(xs[0], wg, wu, wd_im, "silu", threshold=thr, sparsity_hint=s)
            ref = gated_mlp_reference(xs[0], wg, wu, wd, None, None, None, "silu", thr).float()
            ref32 = _cats_ref32(xs[0], wg, wu, wd, thr)
            err = rel_err(y, ref32)
            # where an error comes from: the fused gate/up output h alone
            h = gm.launch_gate_up(xs[0], wg, wu, "silu", thr, sparsity_hint=s)
            g32 = F.silu(xs[0].float() @ wg.float().t())
            h_ref = torch.where(g32.abs() > thr, g32 * (xs[0].float() @ wu.float().t()), 0.0)
            err_h = rel_err(h, h_ref)
            fns = [lambda i=i: gm.launch_gated_mlp(xs[i % N_SETS], wg, wu, wd_im, "silu", threshold=thr, sparsity_hint=s)
                   for i in range(CATS_CALLS)]
            t_sparse = bench_calls(fns)
            g, outs = graph_calls(fns)
            g.replay()
            torch.cuda.synchronize()
            err_graph = rel_err(outs[0], ref32)
            del g, outs
            realized = float(sum((F.silu(x.float() @ wg.float().t()).abs() <= thr).float().mean() for x in xs) / len(xs))
            pred = cost_model.gated_mlp_predict(M, d, f, s, 2, device=device_model)
            ideal = 3.0 / (1.0 + 2.0 * (1.0 - s))
            rows.append(dict(shape=f"cats {d}/{f}", M=M, sparsity=s, realized_sparsity=realized, threshold=thr,
                             rel_err=err, rel_err_graph=err_graph, rel_err_vs_ref_cast=rel_err(y, ref), rel_err_h=err_h,
                             dense_us=t_dense, sparse_us=t_sparse, speedup=t_dense / t_sparse, ideal=ideal,
                             pred_speedup=pred["speedup"]))
            log(f"CATS {d}/{f} M={M:2d} s={s:.2f} dense {t_dense:7.1f}us cats {t_sparse:7.1f}us "
                f"x{t_dense / t_sparse:5.2f} (ideal {ideal:4.2f}, pred {pred['speedup']:4.2f}) err {err:.1e} "
                f"graph {err_graph:.1e} h {err_h:.1e}")
    return rows


def _cats_ref32(x, wg, wu, wd, thr):
    xf = x.float()
    g = F.silu(xf @ wg.float().t())
    h = torch.where(g.abs() > thr, g * (xf @ wu.float().t()), 0.0)
    return h @ wd.float().t()


def gpu_selfcheck(log) -> list:
    """Odd shapes on the GPU against the reference, for EVERY config autotuning may pick: three
    outputs (N not a multiple of the blocks, mixed layouts), biases, row scales, K with a tail;
    then the other dtypes on one config of each path, and the CATS MLP."""
    from actsparse.kernels.triton import sparse_gemv as sg

    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []

    def case(dtype, M, K, ns, cfg, row_scale, channel=False):
        x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
        ws = [(torch.randn(n, K, device="cuda", generator=g) / 8).to(dtype) for n in ns]
        ws = [w.t().contiguous().t() if j != 1 else w for j, w in enumerate(ws)]  # mixed layouts
        bs = [torch.randn(n, device="cuda", generator=g).to(dtype) if j != 1 else None for j, n in enumerate(ns)]
        ths = [0.3 + 0.5 * j for j in range(len(ns))]
        rs = torch.rand(M, device="cuda", generator=g) + 0.5 if row_scale else None
        cts = ([torch.rand(K, device="cuda", generator=g) * 1.5 if j != 1 else None for j in range(len(ns))]
               if channel else None)
        y = sg.launch_sparse_linear(x, ws, bs, ths, rs, config=cfg, channel_thresholds=cts)
        cut = ths if cts is None else [t if c is None else c for t, c in zip(ths, cts)]
        ref = [(masked_ref(x.float(), t, rs) @ w.float().t() + (b.float() if b is not None else 0))
               for w, b, t in zip(ws, bs, cut)]
        errs = [rel_err(a, r) for a, r in zip(y, ref)]
        ok = all(e < tol[dtype] for e in errs)
        out.append(dict(kind="linear-channel-thresholds" if channel else "linear", dtype=str(dtype), M=M, K=K,
                        ns=ns, config=cfg, errs=errs, ok=ok))
        if not ok:
            log(f"SELFCHECK FAIL linear {dtype} M={M} K={K} ns={ns} cfg={cfg} errs={errs}")

    as_dict = lambda c: dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)  # noqa: E731
    for m_list, configs in (([1], sg.CONFIGS_M1), ([2, 3, 5, 16], sg.CONFIGS_DOT)):
        for i, c in enumerate(configs):
            for M in m_list:
                case(torch.bfloat16, M, 4104, [4096, 1024, 1032], as_dict(c), row_scale=True)
            if i == 0:
                case(torch.bfloat16, m_list[-1], 40, [24], as_dict(c), row_scale=False)
    from actsparse.kernels.triton import predicated_gemv as pg

    for m_list, configs in (([1], pg.CONFIGS_M1), ([2, 3, 5, 16], pg.CONFIGS_DOT)):  # the predicated family
        for i, c in enumerate(configs):
            for M in m_list:
                case(torch.bfloat16, M, 4104, [4096, 1024, 1032], as_dict(c), row_scale=True)
            if i == 0:
                case(torch.bfloat16, m_list[-1], 40, [24], as_dict(c), row_scale=False)
    for dtype in (torch.float16, torch.float32):
        for M, c in ((1, sg.CONFIGS_M1[0]), (3, sg.CONFIGS_DOT[0]), (16, sg.CONFIGS_DOT[-1]),
                     (1, pg.CONFIGS_M1[0]), (5, pg.CONFIGS_DOT[0])):
            case(dtype, M, 4104, [4096, 1024, 1032], as_dict(c), row_scale=True)
    for M, c in ((1, sg.CONFIGS_M1[0]), (1, sg.CONFIGS_M1[-1]), (5, sg.CONFIGS_DOT[0]), (1, pg.CONFIGS_M1[1]),
                 (5, pg.CONFIGS_DOT[1])):
        case(torch.bfloat16, M, 4104, [4096, 1024, 1032], as_dict(c), row_scale=M > 1, channel=True)
    # determinism: the same batch case five times; a race shows as differing outputs
    x = torch.randn(5, 4104, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(4096, 4104, device="cuda", generator=g) / 8).to(torch.bfloat16).t().contiguous().t()
    for c, xx in ((sg.CONFIGS_DOT[0], x), (sg.CONFIGS_DOT[1], x[:3]), (sg.CONFIGS_M1[0], x[:1]),
                  (pg.CONFIGS_DOT[0], x), (pg.CONFIGS_M1[0], x[:1])):
        ys = [sg.launch_sparse_linear(xx, [w], [None], [0.5], config=as_dict(c))[0] for _ in range(5)]
        ref = masked_ref(xx.float(), 0.5) @ w.float().t()
        distinct = len({bytes(y.view(torch.int16).cpu().numpy().tobytes()) for y in ys})
        errs = [rel_err(y, ref) for y in ys]
        ok = max(errs) < tol[torch.bfloat16]
        out.append(dict(kind="determinism", config=as_dict(c), distinct_outputs=distinct, errs=errs, ok=ok))
        log(f"determinism {_short(c)}: {distinct} distinct outputs of 5, errs {[f'{e:.1e}' for e in errs]}")
    from actsparse.ops.reference import gated_product_reference

    for (M, c), act in itertools.product(((1, sg.CONFIGS_M1[0]), (5, sg.CONFIGS_DOT[0]), (1, pg.CONFIGS_M1[0]),
                                          (5, pg.CONFIGS_DOT[0])), ("silu", "gelu_tanh")):
        x = torch.randn(M, 4104, device="cuda", generator=g).to(torch.bfloat16)
        ws = [(torch.randn(1032, 4104, device="cuda", generator=g) / 8).to(torch.bfloat16).t().contiguous().t()
              for _ in range(2)]
        h = sg.launch_sparse_linear(x, ws, [None, None], [0.3, 0.8], config=as_dict(c), epilogue=act)[0]
        e = rel_err(h, gated_product_reference(x.float(), [w.float() for w in ws], [0.3, 0.8], act))
        ok = e < 2 * tol[torch.bfloat16]
        out.append(dict(kind="gated-epilogue", act=act, M=M, config=as_dict(c), errs=[e], ok=ok))
        if not ok:
            log(f"SELFCHECK FAIL gated epilogue {act} M={M} cfg={_short(c)} err={e}")
    out += elect_selfcheck(case, as_dict, log, tol, g)
    try:
        out += cats_selfcheck(log, tol, g)
    except Exception as e:
        log(f"CATS selfcheck crashed: {e!r}")
        out.append(dict(kind="cats", ok=False, error=repr(e)))
    log(f"selfcheck: {sum(r['ok'] for r in out)}/{len(out)} cases within tolerance")
    return out


def elect_selfcheck(case, as_dict, log, tol, g) -> list:
    """The predicated kernel finished by its last program ("elect" family): linear cases through
    ``case``, repeated calls (a race on the counters shows as differing outputs) and the gated
    product, each against the fp32 reference."""
    from actsparse.kernels.triton import predicated_gemv as pg
    from actsparse.kernels.triton import sparse_gemv as sg
    from actsparse.ops.reference import gated_product_reference

    out = []
    with sg.forced_family("elect"):  # a pinned predicated config runs the elect kernel
        for M, c in ((1, pg.CONFIGS_M1[0]), (1, pg.CONFIGS_M1[9]), (1, pg.CONFIGS_M1[-1]), (5, pg.CONFIGS_DOT[0]),
                     (16, pg.CONFIGS_DOT[-1])):
            case(torch.bfloat16, M, 4104, [4096, 1024, 1032], as_dict(c), row_scale=True)
        x = torch.randn(5, 4104, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(4096, 4104, device="cuda", generator=g) / 8).to(torch.bfloat16).t().contiguous().t()
        for c, xx in ((pg.CONFIGS_DOT[0], x), (pg.CONFIGS_M1[0], x[:1]), (pg.CONFIGS_M1[9], x[:1])):
            ys = [sg.launch_sparse_linear(xx, [w], [None], [0.5], config=as_dict(c))[0] for _ in range(5)]
            assert sg.last_family() == "elect"
            ref = masked_ref(xx.float(), 0.5) @ w.float().t()
            errs = [rel_err(y, ref) for y in ys]
            distinct = len({bytes(y.view(torch.int16).cpu().numpy().tobytes()) for y in ys})
            out.append(dict(kind="determinism-elect", config=as_dict(c), distinct_outputs=distinct, errs=errs,
                            ok=max(errs) < tol[torch.bfloat16]))
            log(f"determinism elect {_short(c)}: {distinct} distinct outputs of 5, errs {[f'{e:.1e}' for e in errs]}")
        for (M, c), act in itertools.product(((1, pg.CONFIGS_M1[0]), (5, pg.CONFIGS_DOT[0])), ("silu", "gelu_tanh")):
            x = torch.randn(M, 4104, device="cuda", generator=g).to(torch.bfloat16)
            ws = [(torch.randn(1032, 4104, device="cuda", generator=g) / 8).to(torch.bfloat16).t().contiguous().t()
                  for _ in range(2)]
            h = sg.launch_sparse_linear(x, ws, [None, None], [0.3, 0.8], config=as_dict(c), epilogue=act)[0]
            e = rel_err(h, gated_product_reference(x.float(), [w.float() for w in ws], [0.3, 0.8], act))
            out.append(dict(kind="gated-epilogue-elect", act=act, M=M, config=as_dict(c), errs=[e],
                            ok=e < 2 * tol[torch.bfloat16]))
            if not out[-1]["ok"]:
                log(f"SELFCHECK FAIL elect gated epilogue {act} M={M} cfg={_short(c)} err={e}")
    return out


def cats_selfcheck(log, tol, g) -> list:
    from actsparse.kernels.triton import gated_mlp as gm
    from actsparse.kernels.triton import sparse_gemv as sg

    out = []
    down = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in (sg.CONFIGS_M1[0], sg.CONFIGS_DOT[0])]
    for i, (dtype, M, act) in enumerate([(torch.bfloat16, 1, "silu"), (torch.bfloat16, 5, "gelu_tanh"),
                                         (torch.float16, 16, "gelu"), (torch.float32, 2, "relu"),
                                         (torch.float16, 1, "gelu")]):
        d, f = 264, 712
        gcfg = (gm.CONFIGS_M1 if M == 1 else gm.CONFIGS_DOT)[i % 4]
        x = torch.randn(M, d, device="cuda", generator=g).to(dtype)
        wg, wu, wd = [(torch.randn(a, b, device="cuda", generator=g) / 8).to(dtype) for a, b in [(f, d), (f, d), (d, f)]]
        # odd cases carry biases (shifted ReLU's gate has one; the last one all three)
        bs = [(torch.randn(n, device="cuda", generator=g) / 4).to(dtype) if i % 2 and (j == 0 or i == 3) else None
              for j, n in enumerate((f, f, d))]
        yc = gm.launch_gated_mlp(x, wg, wu, wd.t().contiguous().t(), act, threshold=0.2,
                                      gate_config=dict(gcfg.kwargs, num_warps=gcfg.num_warps, num_stages=gcfg.num_stages),
                                      down_config=down[0 if M == 1 else 1], b_gate=bs[0], b_up=bs[1], b_down=bs[2])
        ref = gated_mlp_reference(x.float(), wg, wu, wd, *bs, act, 0.2)
        e = rel_err(yc, ref)
        ok = e < 2 * tol[dtype]
        out.append(dict(kind="cats", dtype=str(dtype), M=M, act=act, biases=sum(b is not None for b in bs), errs=[e],
                        ok=ok))
        if not ok:
            log(f"SELFCHECK FAIL cats {dtype} M={M} {act} err={e}")
    return out


def compile_check(log) -> dict:
    """The actsparse op (shared q/k/v input) compiled with CUDA graphs, against the reference."""
    import actsparse.ops  # noqa: F401  (registers the ops)

    ts = [0.5, 0.6, 0.7]
    K = 4096
    ws = [(torch.randn(n, K, device="cuda") / 64).to(torch.bfloat16).t().contiguous().t() for n in (4096, 1024, 1024)]

    def step(x):
        q, k, v = torch.ops.actsparse.sparse_linear(x * 2.0, ws, [None, None, None], ts, False, 0.5)
        return torch.cat([q, k, v], dim=-1) * 0.5  # doubling is exact in bf16: the masked input is known

    cstep = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    t0 = time.time()
    errs = []
    for i in range(6):
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        y = cstep(x)
        ref = torch.cat([masked_ref((x * 2.0).float(), t) @ w.float().t() for w, t in zip(ws, ts)], dim=-1) * 0.5
        errs.append(rel_err(y, ref))
    res = dict(ok=max(errs) < ERR_OK, errs=errs, compile_and_run_s=time.time() - t0)
    log(f"compile check (actsparse op, reduce-overhead): errs {[f'{e:.1e}' for e in errs]} in "
        f"{res['compile_and_run_s']:.0f}s")
    return res


def disagreements(rows, tol=0.25):
    """Points where the cost model's speedup is off by more than `tol` (relative), or where it
    picks the wrong path (predicts sparse faster when it measured slower, or vice versa).
    Points whose output was wrong are left out."""
    out = []
    for r in rows:
        if "pred_speedup" not in r or max(r["rel_err"], r.get("rel_err_graph", 0.0)) > ERR_OK:
            continue
        off = abs(r["pred_speedup"] - r["speedup"]) / r["speedup"]
        wrong = ("prefer_sparse_pred" in r) and (r["prefer_sparse_pred"] != (r["speedup"] > 1.0))
        if off > tol or wrong:
            out.append(dict(shape=r["shape"], M=r["M"], sparsity=r["sparsity"], measured=r["speedup"],
                            predicted=r["pred_speedup"], wrong_choice=bool(wrong)))
    return out


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["linear"] if r["M"] == 1]
    shapes = [s for s in SHAPES if any(r["shape"] == s for r in rows)]
    fig, axes = plt.subplots(1, max(len(shapes), 1), figsize=(4.2 * max(len(shapes), 1), 3.8), squeeze=False)
    for ax, name in zip(axes[0], shapes):
        rs = sorted([r for r in rows if r["shape"] == name], key=lambda r: r["sparsity"])
        sp = [r["sparsity"] for r in rs]
        ax.plot(sp, [r["speedup"] for r in rs], "o-", label="actsparse (bf16)")
        if any(r.get("teal_like_us") for r in rs):
            ax.plot(sp, [r["dense_us"] / r["teal_like_us"] for r in rs], "s:", color="gray", ms=3,
                    label="our kernel, TEAL-style config")
        ax.plot(TEAL_SPARSITIES, TEAL_H100[name], "k--", label="TEAL kernel (fp16, ANCHORS)")
        ax.plot(sp, [r["ideal"] for r in rs], ":", color="green", label="ideal 1/(1-s)")
        ax.plot(sp, [r["pred_speedup"] for r in rs], "-", color="orange", alpha=0.6, lw=1, label="cost model")
        ax.axhline(1.0, color="red", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel("sparsity")
        top = max([r["speedup"] for r in rs] + TEAL_H100[name] + [r["pred_speedup"] for r in rs])
        ax.set_ylim(0, max(2.0, top * 1.25))  # the ideal line leaves the chart at high sparsity
    axes[0][0].set_ylabel("speedup over dense cuBLAS, batch 1")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"input-sparse GEMV, {result['meta']['gpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result) -> str:
    meta = result["meta"]
    lines = [f"# Kernel benchmark on {meta['gpu']}", "",
             f"`{meta['command']}`  ", f"torch {meta['torch']}, triton {meta['triton']}, "
             f"copy bandwidth {meta['copy_bandwidth_TBps']:.2f} TB/s (read + write), {meta['date']}", "",
             "Speedup = dense cuBLAS `F.linear` (row-major bf16 weight) time / sparse kernel time. Each time is "
             f"the median replay of one CUDA graph of {CALLS_PER_GRAPH} back-to-back calls of the layer (as in a "
             "decode step), divided by the number of calls; the calls rotate over 4 input sets and over enough "
             "copies of the weight that none is found in L2; inputs random normal, per-row independent masks "
             "(worst case for the batch union).", "",
             "## Batch 1: speedup by sparsity (ours / TEAL's H100 numbers / ideal 1/(1-s))", ""]
    lin = result["linear"]
    sps = sorted({r["sparsity"] for r in lin})
    lines.append("| shape | dense us | " + " | ".join(f"{int(s * 100)}%" for s in sps) + " |")
    lines.append("|---|---|" + "---|" * len(sps))
    for name in SHAPES:
        rs = {r["sparsity"]: r for r in lin if r["shape"] == name and r["M"] == 1}
        if not rs:
            continue
        cells = []
        for s in sps:
            r = rs.get(s)
            teal = TEAL_H100[name][TEAL_SPARSITIES.index(s)] if s in TEAL_SPARSITIES else None
            cells.append("-" if r is None else f"**{r['speedup']:.2f}** / {teal if teal else '-'} / {r['ideal']:.2f}")
        d = next(iter(rs.values()))["dense_us"]
        lines.append(f"| {name} | {d:.1f} | " + " | ".join(cells) + " |")
    fam = [r for r in lin if r.get("predicated_us")]
    if fam:
        lines += ["", "## Kernel families: speedup of each alone and the per-key choice", "",
                  "compact: index lists (`sparse_gemv`); predicated: TEAL-style loads with a finishing launch "
                  "(`predicated_gemv`); each autotuned within itself. `chosen`: the family the launcher picked "
                  "for the key (shape, batch bucket, sparsity bucket).", "",
                  "| shape | M | s | compact | predicated | chosen | autotuned | ideal |", "|---|---|---|---|---|---|---|---|"]
        for r in fam:
            lines.append(f"| {r['shape']} | {r['M']} | {int(r['sparsity'] * 100)}% | {r['compact_x']:.2f} "
                         f"({r.get('config', '-')}) | {r['predicated_x']:.2f} ({r.get('predicated_config', '-')}) | "
                         f"{r.get('family')} | {r['speedup']:.2f} | {r['ideal_union']:.2f} |")
    bad = [r for r in lin + result.get("cats", []) if _bad(r)]
    lines += ["", "## Batches: speedup (measured union density in brackets)", "",
              f"WRONG marks outputs with relative error above {ERR_OK:g} ({len(bad)} points"
              + (f", batches {sorted({r['M'] for r in bad})}" if bad else "") + "). A cell marked "
              "(dense) is one where the cost model (`prefer_sparse` against the fallback) has the backend run "
              "the masked dense matmul instead of the kernel: at compile time for a traced batch size the "
              "rewrite emits the mask, fused by Inductor into the input's producer, and a plain linear on "
              "the input-major storage (`passes/dense_choice.py`; cuBLAS on that storage: "
              "benchmarks/results/gpu_probe_h100.json). The `fallback_us` column of the JSON is the op's own "
              "run-time fallback (separate masking launches), now used only with dynamic shapes.", ""]
    bs = sorted({r["M"] for r in lin})
    lines.append("| shape | s | " + " | ".join(f"M={m}" for m in bs) + " |")
    lines.append("|---|---|" + "---|" * len(bs))
    for name in SHAPES:
        for s in sps:
            rs = {r["M"]: r for r in lin if r["shape"] == name and r["sparsity"] == s}
            if not rs:
                continue
            lines.append(f"| {name} | {int(s * 100)}% | " + " | ".join(
                (f"{rs[m]['speedup']:.2f} ({rs[m]['union_measured']:.2f})" + (" WRONG" if _bad(rs[m]) else "")
                 + ("" if rs[m].get("wrapper_sparse", True) else " (dense)"))
                if m in rs else "-" for m in bs) + " |")
    if result.get("cats"):
        lines += ["", "## CATS gated MLP 4096/14336 (silu): speedup over dense gate+up+down", ""]
        cs = result["cats"]
        bs_c = sorted({r["M"] for r in cs})
        sps_c = sorted({r["sparsity"] for r in cs})
        lines.append("| s | ideal | " + " | ".join(f"M={m}" for m in bs_c) + " |")
        lines.append("|---|---|" + "---|" * len(bs_c))
        for s in sps_c:
            rs = {r["M"]: r for r in cs if r["sparsity"] == s}
            ideal = next(iter(rs.values()))["ideal"]
            lines.append(f"| {int(s * 100)}% | {ideal:.2f} | " + " | ".join(
                (f"{rs[m]['speedup']:.2f}" + (" WRONG" if _bad(rs[m]) else "")) if m in rs else "-"
                for m in bs_c) + " |")
    ok1 = [max(r["rel_err"], r.get("rel_err_graph", 0.0)) for r in lin + result.get("cats", []) if r["M"] == 1]
    derr = [r["dense_bf16_rel_err"] for r in lin] + [0.0]
    lines += ["", f"Batch 1, max relative error vs fp32 reference: {max(ok1 + [0.0]):.2e} eager and replayed "
              f"from CUDA graphs (dense bf16 F.linear on the same masked input: up to {max(derr):.2e}).", ""]
    if result.get("checks"):
        sc = result["checks"].get("selfcheck", [])
        cc = result["checks"].get("compile", {})
        lines += [f"GPU self-check: {sum(c['ok'] for c in sc)}/{len(sc)} cases within tolerance "
                  f"(failures: {', '.join(sorted({c['kind'] + ' M=' + str(c.get('M')) for c in sc if not c['ok']})) or 'none'}). "
                  f"torch.compile (custom op, mode=reduce-overhead) check: {'ok' if cc.get('ok') else 'FAILED'}.", ""]
    if result["meta"].get("predictions"):
        lines += [f"Cost-model predictions: {result['meta']['predictions']}", ""]
    dis = result.get("cost_model_disagreements", [])
    lines += [f"## Cost model: {len(dis)} of {len(lin)} points off by more than 25% or choosing the wrong path", ""]
    for d in dis[:40]:
        lines.append(f"- {d['shape']} M={d['M']} s={d['sparsity']}: measured {d['measured']:.2f}, "
                     f"predicted {d['predicted']:.2f}" + (" (wrong choice)" if d["wrong_choice"] else ""))
    return "\n".join(lines) + "\n"


def _bad(r) -> bool:
    return max(r["rel_err"], r.get("rel_err_graph", 0.0)) > ERR_OK


def repredict(result):
    """Recompute the cost-model columns with the current model (e.g. after refitting it)."""
    from actsparse.ops import cost_model

    dev = cost_model.Device(bandwidth=result["meta"]["copy_bandwidth_TBps"] * 1e12)
    for r in result["linear"]:
        p = cost_model.predict(r["M"], r["K"], r["N"], r["sparsity"], 2, device=dev)
        r.update(pred_speedup=p["speedup"], pred_sparse_us=p["sparse_s"] * 1e6, pred_dense_us=p["dense_s"] * 1e6,
                 pred_fallback_us=p["fallback_s"] * 1e6,
                 prefer_sparse_pred=cost_model.prefer_sparse(r["M"], r["K"], r["N"], r["sparsity"], 2, device=dev),
                 wrapper_sparse=cost_model.prefer_sparse(r["M"], r["K"], r["N"], r["sparsity"], 2, against="fallback"))
    for r in result.get("cats", []):
        r["pred_speedup"] = cost_model.gated_mlp_predict(r["M"], 4096, 14336, r["sparsity"], 2, device=dev)["speedup"]
    result["meta"]["cost_model"] = dict(dev.__dict__)
    result["cost_model_disagreements"] = disagreements(result["linear"])


def compact_table(result) -> str:
    lin = result["linear"]
    sps = sorted({r["sparsity"] for r in lin} | {r["sparsity"] for r in result.get("cats", [])})
    out = ["speedup over dense cuBLAS (rows: shape, batch; cols: sparsity)",
           f"{'shape':22s} {'M':>2s} {'dense':>7s} " + " ".join(f"{int(s * 100):>5d}%" for s in sps)]
    for name in SHAPES:
        for m in sorted({r["M"] for r in lin}):
            rs = {r["sparsity"]: r for r in lin if r["shape"] == name and r["M"] == m}
            if rs:
                d = next(iter(rs.values()))["dense_us"]
                out.append(f"{name:22s} {m:2d} {d:6.1f}u " + " ".join(
                    (f"{rs[s]['speedup']:5.2f}" + ("!" if _bad(rs[s]) else " ")) if s in rs else "     -"
                    for s in sps))
    for m in sorted({r["M"] for r in result.get("cats", [])}):
        rs = {r["sparsity"]: r for r in result["cats"] if r["M"] == m}
        d = next(iter(rs.values()))["dense_us"]
        out.append(f"{'CATS 4096/14336':22s} {m:2d} {d:6.1f}u " + " ".join(
            (f"{rs[s]['speedup']:5.2f}" + ("!" if _bad(rs[s]) else " ")) if s in rs else "     -" for s in sps))
    nbad = sum(_bad(r) for r in lin + result.get("cats", []))
    out.append(f"! = wrong output (rel err > {ERR_OK:g}): {nbad} points; "
               f"cost-model disagreements {len(result['cost_model_disagreements'])}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/kernels_h100.json")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), help="names from SHAPES (prefix match)")
    p.add_argument("--batches", nargs="*", type=int, default=BATCHES)
    p.add_argument("--sparsities", nargs="*", type=float, default=SPARSITIES)
    p.add_argument("--cats-batches", nargs="*", type=int, default=BATCHES)
    p.add_argument("--no-cats", action="store_true")
    p.add_argument("--checks", action="store_true", help="GPU self-check first, torch.compile check last")
    p.add_argument("--max-seconds", type=float, default=480.0, help="stop the linear sweep after this long")
    p.add_argument("--cats-max-seconds", type=float, default=560.0, help="stop the CATS sweep after this long")
    p.add_argument("--plot-only", action="store_true", help="re-draw PNG and markdown from an existing JSON")
    p.add_argument("--repredict", action="store_true",
                   help="with --plot-only: recompute the cost-model columns with the current model")
    a = p.parse_args(argv)
    stem = os.path.splitext(a.out)[0]
    if a.plot_only:
        with open(a.out) as fh:
            result = json.load(fh)
        if a.repredict:
            repredict(result)
            result["meta"]["predictions"] = ("recomputed after the run with the current cost model "
                                             "(actsparse/kernels/cost_model.py defaults: fitted to this run's "
                                             "points, the fallback refit to benchmarks/results/gpu_probe_h100.json): "
                                             "`python -m benchmarks.kernels --plot-only --repredict`")
            with open(a.out, "w") as fh:
                json.dump(result, fh, indent=1)
        plot(result, stem + ".png")
        with open(stem + ".md", "w") as fh:
            fh.write(markdown(result))
        print(compact_table(result))
        return

    import triton

    from actsparse.ops import cost_model

    t0 = time.time()
    deadline = t0 + a.max_seconds
    log_lines = []

    def log(msg):
        msg = f"[{time.time() - t0:5.0f}s] {msg}"
        print(msg, flush=True)
        log_lines.append(msg)

    bw = copy_bandwidth()
    dev_model = cost_model.Device(bandwidth=bw)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                command="PYTHONPATH=. python3 -m benchmarks.kernels " + " ".join(sys.argv[1:] if argv is None else argv),
                date=time.strftime("%Y-%m-%d %H:%M"), copy_bandwidth_TBps=bw / 1e12,
                cost_model=dict(dev_model.__dict__), n_input_sets=N_SETS)
    log(f"{meta['gpu']}: copy bandwidth {bw / 1e12:.2f} TB/s")
    result = dict(meta=meta, checks={}, linear=[], cats=[], teal_h100=TEAL_H100, cost_model_disagreements=[],
                  log=log_lines)

    def save():
        result["cost_model_disagreements"] = disagreements(result["linear"])
        result["wall_s"] = time.time() - t0
        # the shared result shape (gpu, command, rows) beside this benchmark's detailed tables
        result.update(gpu=meta["gpu"], command=meta["command"],
                      rows=[dict(variant="ours", batch=r["M"], sparsity=r["sparsity"], shape=r["shape"],
                                 ours_x=r["speedup"], ideal_x=r["ideal"]) for r in result["linear"]])
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)

    if a.checks:
        try:
            result["checks"]["selfcheck"] = gpu_selfcheck(log)
        except Exception as e:
            log(f"selfcheck crashed: {e!r}")
        save()
    for name, (K, N) in SHAPES.items():
        if any(name.startswith(s) for s in a.shapes):
            try:
                bench_linear(result["linear"], name, K, N, a.batches, a.sparsities, dev_model, log, deadline)
            except Exception as e:
                log(f"linear {name} crashed: {e!r}")
            save()
    if not a.no_cats:
        try:
            bench_cats(result["cats"], 4096, 14336, a.cats_batches, a.sparsities, dev_model, log,
                       t0 + a.cats_max_seconds)
        except Exception as e:
            log(f"CATS crashed: {e!r}")
        save()
    if a.checks:
        try:
            result["checks"]["compile"] = compile_check(log)
        except Exception as e:
            log(f"compile check failed: {e!r}")
            result["checks"]["compile"] = dict(ok=False, error=repr(e))
    save()
    try:  # the numbers matter more than the picture
        with open(stem + ".md", "w") as fh:
            fh.write(markdown(result))
        plot(result, stem + ".png")
        print(compact_table(result))
    except Exception as e:
        log(f"report failed: {e!r}")
    print(f"wall {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
