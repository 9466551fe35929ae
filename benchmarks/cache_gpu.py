"""GPU benchmark: the weight-row cache against the Triton input-sparse kernel, batch 1, 4 and 16.

    PYTHONPATH=. python3 -m benchmarks.cache_gpu --out benchmarks/results/cache_gpu_h100.json

The question: per batch bucket, which path should the backend take for an input-sparse linear
in decode: the Triton kernel (reads the active weight rows in place, computes the mask itself),
the cached-weight index (:class:`WeightRowCache`: keeps last step's gathered rows, copies only
the rows that changed, then multiplies over the compact prefix), or dense cuBLAS?

Setup, at Llama-3-8B shapes in bf16:

* Masks: every batch row has its own mask with a fixed number of active channels
  (``1 - sparsity``); ``overlap`` is the fraction of a step's active channels that were active
  at the previous step (the measured consecutive-token value on SmolLM2 and 0.9), produced by
  :func:`index_step.mask_sequence`. Rows are independent, so the union the cache and the
  kernel must read grows with the batch (``union_density`` in the output); real batches share
  hot channels, so this is the unfavourable end for both sparse paths.
* Inputs: ``|x| > threshold`` exactly on each row's mask (:func:`index_step.x_for_mask`), so
  the Triton kernel derives the same masks the cache is given.
* Every step gets the next mask of a chain of ``warmup + steps`` distinct masks (as in decode);
  the first ``warmup`` steps are not timed.
* Variants: ``dense`` (``F.linear`` on row-major W), ``triton`` (``launch_sparse_linear`` on the
  input-major copy, eager), ``triton_graph`` (the same call replayed from a CUDA graph of one
  call), ``cache`` (``cached_matmul``: union, cache step, multiply over the prefix), ``gather``
  (``index_select`` of the union's rows + multiply: what the cache saves over).
* Before every timed call a 256 MiB buffer is read (outside the timed region) so that L2 holds
  none of the weights, as in decode where the other layers' weights stream through it.
* The Triton kernel is autotuned (per shape, batch bucket and sparsity bucket, as the backend
  does) before anything is timed.

Two timings per call (medians over the timed steps):

* ``gpu`` (primary, the recommendation): CUDA events around the call, with the flush queued
  ahead and no synchronisation before the call, so the host runs ahead of the GPU as in a
  decode loop that is not host-bound. Launch overhead is then hidden, unless the variant itself
  waits for the GPU: the cache and gather steps call ``nonzero`` (a device-to-host sync), so
  the host work after it shows up as idle GPU time inside their event interval. This is why
  the cache cannot be captured in a CUDA graph; ``host_syncs`` counts the syncs per call
  (``torch.cuda.set_sync_debug_mode("warn")``). The flush is followed by a short GPU spin
  (``--head-start-us``) so that the host is ahead; ``enqueue_ms`` is the host time to issue
  the call (for a variant that syncs, including the wait): where it exceeds ``flush_ms +
  head_start_ms`` for dense or triton, launch overhead leaks into their event interval.
* ``wall``: flush, synchronise, then host clock around the call and a synchronise: the
  latency on an idle GPU including Python and launch overhead (an eager, host-bound decode).

``--dry-run`` runs the same code on CPU at tiny shapes (the Triton kernel in Triton's
interpreter, host clock only) to check the logic and the correctness checks without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.index_step import THRESHOLD, cpu_model, mask_sequence, x_for_mask
from benchmarks.harness import ERR_OK, graph_of
from actsparse.kernels.weight_cache import WeightRowCache, cached_matmul

SHAPES = {"gate_up 4096->14336": (4096, 14336), "down 14336->4096": (14336, 4096)}  # (K, N), Llama-3-8B
DRY_SHAPES = {"gate_up-like 64->96": (64, 96), "down-like 96->64": (96, 64)}
BATCHES = [1, 4, 16]
SPARSITIES = [0.5, 0.25, 0.7]  # the first is the main point (the 50% plan)
FALLBACK_OVERLAP = 0.58  # measured on SmolLM2-135M with a 50% plan, if the JSON is missing
SECOND_OVERLAP = 0.9
OVERLAP_JSON = Path(__file__).resolve().parents[2] / "benchmarks" / "overlap_smollm2-135m.json"
CANDIDATES = ("triton", "cache", "dense")  # what the backend can choose between
CHECKED = ("triton", "triton_graph", "cache", "gather")  # variants whose output is checked


@dataclass
class Variant:
    """One way to compute step ``i``; ``prepare`` runs outside the timed region (graph input)."""

    fn: Callable[[int], Tensor]
    prepare: Optional[Callable[[int], None]] = None
    keep: object = None  # what must outlive the calls (a captured graph)


@dataclass
class Case:
    """One benchmark point on the device: weights and the masks and inputs of every step."""

    shape: str
    W: Tensor  # [N, K], nn.Linear layout (dense cuBLAS)
    Wt: Tensor  # [K, N] input-major: the cache's rows; Wt.t() is the Triton kernel's layout
    W32: Tensor  # fp32 reference weights
    masks: Tensor  # [steps, M, K] bool
    xs: Tensor  # [steps, M, K], |x| > THRESHOLD exactly on masks
    sparsity: float


# ---------------------------------------------------------------------------------------- inputs


def measured_overlap(path: Path = OVERLAP_JSON) -> tuple[float, str]:
    """The consecutive-token overlap measured on SmolLM2 (50% plan), or the fallback."""
    try:
        return float(json.loads(Path(path).read_text())["overall_overlap_mean"]), "overlap_smollm2-135m.json"
    except (OSError, KeyError, ValueError):
        return FALLBACK_OVERLAP, "fallback constant"


def build_inputs(K: int, rows: int, steps: int, sparsity: float, overlap: float, seed: int,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Masks ``[steps, rows, K]`` (one independent mask chain per batch row) and matching x.

    Batch ``M`` uses the first ``M`` rows, so every batch sees the same per-row masks.
    """
    g = torch.Generator().manual_seed(seed)
    active = round((1 - sparsity) * K)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: on a busy host each parallel region can stall
    try:
        chains = [mask_sequence(K, steps, active, overlap, g) for _ in range(rows)]
        masks = torch.stack([torch.stack([c[i] for c in chains]) for i in range(steps)])
        xs = torch.stack([torch.cat([x_for_mask(masks[i, r], g, dtype) for r in range(rows)]) for i in range(steps)])
    finally:
        torch.set_num_threads(threads)
    if not torch.equal(xs.float().abs() > THRESHOLD, masks):
        raise AssertionError("x does not reproduce the masks at the threshold")
    return masks, xs


def overlap_of(masks: Tensor) -> float:
    """Mean fraction of a step's active entries active at the previous step (masks [steps, R])."""
    m = masks.float()
    kept = (m[1:] * m[:-1]).sum(-1)
    return float((kept / m[1:].sum(-1).clamp_min(1)).mean())


def union_stats(masks: Tensor, warmup: int) -> dict:
    """Density and step-to-step overlap of the union over the batch rows (what is gathered)."""
    u = masks.any(1)
    return dict(union_density=float(u[warmup:].float().mean()), union_overlap=overlap_of(u[max(warmup - 1, 0):]),
                row_overlap=float(sum(overlap_of(masks[max(warmup - 1, 0):, r]) for r in range(masks.shape[1]))
                                  / masks.shape[1]))


def make_weights(K: int, N: int, device: torch.device, seed: int) -> dict[str, Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(N, K, device=device, generator=g) * 0.02).to(torch.bfloat16)
    return dict(W=W, Wt=W.t().contiguous(), W32=W.float())


# -------------------------------------------------------------------------------------- variants


def _sparse_gemv():
    """Imported lazily: Triton (and, on CPU, its interpreter setting) is needed only here."""
    from actsparse.kernels.triton import sparse_gemv

    return sparse_gemv


def dense_variant(c: Case) -> Variant:
    return Variant(lambda i: F.linear(c.xs[i], c.W))


def triton_variant(c: Case) -> Variant:
    sg, w = _sparse_gemv(), c.Wt.t()  # logical [N, K], strides (1, N)
    return Variant(lambda i: sg.launch_sparse_linear(c.xs[i], [w], [None], [THRESHOLD], sparsity_hint=c.sparsity)[0])


def triton_graph_variant(c: Case) -> Variant:
    """The kernel replayed from a CUDA graph of one call; the step's x is copied in untimed."""
    sg, w = _sparse_gemv(), c.Wt.t()
    x_static = c.xs[0].clone()
    g, out = graph_of(lambda: sg.launch_sparse_linear(x_static, [w], [None], [THRESHOLD],
                                                      sparsity_hint=c.sparsity)[0])

    def prepare(i: int) -> None:
        x_static.copy_(c.xs[i])

    def replay(i: int) -> Tensor:
        g.replay()
        return out

    return Variant(replay, prepare=prepare, keep=g)


def cache_variant(c: Case, copied: list[int]) -> Variant:
    """A fresh cache per timed pass (its state is the previous step's mask)."""
    cache = WeightRowCache(c.Wt)

    def step(i: int) -> Tensor:
        y = cached_matmul(cache, c.xs[i], c.masks[i])
        copied.append(cache.rows_copied_last)
        return y

    return Variant(step)


def gather_variant(c: Case, buf: Tensor) -> Variant:
    """Re-gather every row of the union (into a preallocated buffer), then multiply."""

    def gather(i: int) -> Tensor:
        m = c.masks[i]
        idx = m.any(0).nonzero().squeeze(1)
        rows = torch.index_select(c.Wt, 0, idx, out=buf[: idx.numel()])
        return torch.mm((c.xs[i] * m).index_select(1, idx), rows)

    return Variant(gather)


# ---------------------------------------------------------------------------------------- timing


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_pass(variants: dict[str, Variant], n_steps: int, warmup: int, mode: str, flush: Callable[[], object],
               dev: torch.device, check: Optional[Callable[[int, dict], None]] = None) -> dict[str, dict]:
    """Run every variant on every step, interleaved, flushing L2 before each call.

    Returns per variant the milliseconds of the timed steps (``ms``) and, in ``gpu`` mode, the
    host time to issue each call (``enqueue``). ``check(i, outputs)`` runs after each step.
    """
    res = {k: dict(ms=[], enqueue=[]) for k in variants}
    for i in range(n_steps):
        outs, pending = {}, []
        for name, v in variants.items():
            if v.prepare is not None:
                v.prepare(i)
            flush()
            if mode == "gpu":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                t0 = time.perf_counter()
                outs[name] = v.fn(i)
                t1 = time.perf_counter()
                b.record()
                pending.append((name, a, b, t1 - t0))
            else:
                _sync(dev)
                t0 = time.perf_counter()
                outs[name] = v.fn(i)
                _sync(dev)
                pending.append((name, None, None, time.perf_counter() - t0))
        _sync(dev)
        for name, a, b, host_s in pending:
            if i >= warmup:
                res[name]["ms"].append(a.elapsed_time(b) if a is not None else 1e3 * host_s)
                res[name]["enqueue"].append(1e3 * host_s)
        if check is not None:
            check(i, outs)
    return res


def count_host_syncs(fn: Callable[[], object], dev: torch.device) -> Optional[int]:
    """Synchronising CUDA calls made by ``fn`` (None on CPU), via torch's sync debug mode."""
    if dev.type != "cuda":
        return None
    _sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(dev)
    return sum("synchroniz" in str(w.message) for w in caught)


def _gpu_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """Median GPU time of ``fn`` in ms (CUDA events)."""
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[reps // 2]


def make_flush(mib: int, head_start_us: float, dev: torch.device) -> tuple[Callable[[], object], dict]:
    """Evict L2 by reading ``mib`` MiB (a read leaves no dirty lines to write back later), then
    keep the GPU busy ``head_start_us`` more (a spin kernel) so that the host issues the timed
    call before the GPU reaches it. Returns the function and its measured GPU times (ms)."""
    buf = torch.ones(max(mib, 0) << 18, dtype=torch.float32, device=dev)
    cycles = 0
    if dev.type == "cuda" and head_start_us > 0 and hasattr(torch.cuda, "_sleep"):
        per_ms = 1e6 / _gpu_ms(lambda: torch.cuda._sleep(1_000_000))  # spin cycles per ms
        cycles = int(per_ms * head_start_us / 1e3)

    def flush():
        if buf.numel():
            buf.max()
        if cycles:
            torch.cuda._sleep(cycles)

    if dev.type != "cuda":
        return flush, dict(flush_ms=0.0, head_start_ms=0.0)
    read_ms = _gpu_ms(lambda: buf.max()) if buf.numel() else 0.0
    return flush, dict(flush_ms=read_ms, head_start_ms=_gpu_ms(flush) - read_ms)


# -------------------------------------------------------------------------------------- one case


def rel_err_rows(y: Tensor, ref: Tensor) -> float:
    """Max over batch rows of ||y - ref|| / ||ref|| (fp32)."""
    d = (y.float() - ref).norm(dim=-1)
    return float((d / ref.norm(dim=-1).clamp_min(1e-30)).max())


def shared_variants(c: Case, args, dev: torch.device) -> tuple[dict[str, Variant], Optional[str]]:
    """The stateless variants (the cache is made per pass); autotunes the kernel first on a GPU."""
    tv = triton_variant(c)
    if dev.type == "cuda":
        tv.fn(0)  # autotune before any timing or graph capture
    shared, graph_error = {"dense": dense_variant(c), "triton": tv}, None
    if dev.type == "cuda" and not args.no_graph:
        try:
            shared["triton_graph"] = triton_graph_variant(c)
        except Exception as e:  # report it, keep the other variants
            graph_error = repr(e)
    K, N = c.Wt.shape
    shared["gather"] = gather_variant(c, torch.empty(K, N, dtype=c.Wt.dtype, device=dev))
    return shared, graph_error


def run_passes(c: Case, shared: dict[str, Variant], args, flush: Callable[[], object], dev: torch.device,
               modes: list[str]) -> dict:
    """One timed pass per mode (a fresh cache each); the first also checks every output against
    the fp32 reference and counts host syncs."""
    errs = {k: 0.0 for k in CHECKED if k in shared or k == "cache"}

    def check(i: int, outs: dict) -> None:
        ref = (c.xs[i].float() * c.masks[i]) @ c.W32.t()
        for k in errs:
            errs[k] = max(errs[k], rel_err_rows(outs[k], ref))

    timings, syncs, copied = {}, {}, []
    for n, mode in enumerate(modes):
        pass_copied: list[int] = []
        variants = dict(shared, cache=cache_variant(c, pass_copied))
        timings[mode] = timed_pass(variants, c.masks.shape[0], args.warmup, mode, flush, dev,
                                   check if n == 0 else None)
        if n == 0:
            copied = pass_copied[args.warmup:]
            for k, v in variants.items():  # one more call each (the cache: one more diff step)
                if v.prepare is not None:
                    v.prepare(args.warmup)
                syncs[k] = count_host_syncs(lambda v=v: v.fn(args.warmup), dev)
        del variants
    return dict(timings=timings, errs=errs, syncs=syncs, copied=copied)


def summarise(c: Case, res: dict, warmup: int, modes: list[str]) -> dict:
    """Medians, speedups, errors and the fastest variant of one point."""
    K, N = c.Wt.shape
    timings, copied, i0 = res["timings"], res["copied"], warmup
    med = {m: {k: statistics.median(v["ms"]) for k, v in t.items()} for m, t in timings.items()}
    row = dict(K=K, N=N, M=c.masks.shape[1], sparsity=c.sparsity, **union_stats(c.masks.cpu(), warmup),
               cache_rows_copied_median=sorted(copied)[len(copied) // 2] if copied else None)
    row["cache_rows_copied_frac"] = row["cache_rows_copied_median"] / K if copied else None
    row["ms"] = ms = med[modes[0]]
    row["ms_by_mode"] = med
    if "gpu" in timings:
        row["enqueue_ms"] = {k: statistics.median(v["enqueue"]) for k, v in timings["gpu"].items()}
    row["speedup_vs_dense"] = {k: ms["dense"] / v for k, v in ms.items() if k != "dense"}
    row["max_rel_err"] = res["errs"]
    ref = (c.xs[i0].float() * c.masks[i0]) @ c.W32.t()  # yardstick: dense bf16 on the masked input
    row["dense_bf16_rel_err"] = rel_err_rows(F.linear(c.xs[i0] * c.masks[i0], c.W), ref)
    row["ok"] = all(e < ERR_OK for e in res["errs"].values())
    row["host_syncs"] = res["syncs"]
    row["fastest"] = min(CANDIDATES, key=lambda k: ms[k])
    row["fastest_any"] = min(ms, key=ms.get)
    if "wall" in med and modes[0] != "wall":
        row["fastest_wall"] = min(CANDIDATES, key=lambda k: med["wall"][k])
    return row


def bench_case(c: Case, args, flush: Callable[[], object], dev: torch.device, modes: list[str]) -> dict:
    """Every variant on one (shape, M, sparsity, overlap) point: errors, timings, host syncs."""
    shared, graph_error = shared_variants(c, args, dev)
    row = summarise(c, run_passes(c, shared, args, flush, dev, modes), args.warmup, modes)
    if graph_error:
        row["triton_graph_error"] = graph_error
    return row


# -------------------------------------------------------------------------------------- report


def recommendations(rows: list[dict], main_sparsity: float, main_overlap: float) -> dict:
    """Fastest of triton / cache / dense per (shape, M) at the main point, and per batch bucket
    (summed over the shapes, like one MLP), with the winners at the other points alongside."""
    per_shape, by_batch = [], {}
    order = list(dict.fromkeys(r["shape"] for r in rows))
    keys = sorted({(r["shape"], r["M"]) for r in rows}, key=lambda k: (k[1], order.index(k[0])))
    for shape, M in keys:
        rs = [r for r in rows if r["shape"] == shape and r["M"] == M]
        main = next((r for r in rs if r["sparsity"] == main_sparsity and r["overlap"] == main_overlap), rs[0])
        by_point = {f"s={r['sparsity']:.2f} o={r['overlap']:.2f}": r["fastest"] for r in rs}
        per_shape.append(dict(shape=shape, M=M, fastest=main["fastest"],
                              at=dict(sparsity=main["sparsity"], overlap=main["overlap"]),
                              ms={k: main["ms"][k] for k in CANDIDATES},
                              fastest_by_point=by_point, same_at_every_point=len(set(by_point.values())) == 1,
                              fastest_of_all_variants=main["fastest_any"],
                              fastest_wall=main.get("fastest_wall")))
    for M in sorted({r["M"] for r in rows}):
        mains = [p for p in per_shape if p["M"] == M]
        total = {k: sum(p["ms"][k] for p in mains) for k in CANDIDATES}
        by_batch[str(M)] = dict(fastest=min(total, key=total.get), ms_sum_over_shapes=total)
    return dict(per_shape=per_shape, by_batch=by_batch)


def _f(v: Optional[float], fmt: str = "{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


VARIANT_ORDER = ("dense", "triton", "triton_graph", "cache", "gather")


def markdown(report: dict) -> str:
    """The rows as tables: primary timing with speedups and errors, recommendations, wall times."""
    s = report["settings"]
    lines = [f"# Weight-row cache vs Triton kernel vs dense ({report['device']})", "",
             f"`{report['command']}`", "",
             f"torch {report['torch']}, triton {report['triton']}; bf16; threshold {s['threshold']}; "
             f"{s['steps']} timed steps after {s['warmup']} warm-up, a new mask every step; "
             f"L2 flushed ({s['flush_mib']} MiB read, {s['flush_ms']:.3f} ms, then {s['head_start_ms']:.3f} ms of "
             "GPU spin as the host's head start) before every call.", "",
             f"Timing: {s['timing']}", "", f"Host syncs: {report['host_sync_note']}", "",
             f"Masks: {s['masks']}. Errors: {s['error']}.", "",
             *(["**Dry run** (CPU, Triton interpreter, tiny shapes): checks the logic; the timings mean nothing.", ""]
               if report.get("dry_run") else []),
             "| shape | M | sparsity | overlap | union density | union overlap | "
             + " | ".join(f"{v} ms" for v in VARIANT_ORDER)
             + " | triton x | cache x | gather x | fastest | err triton / graph / cache / gather |",
             "|" + "---|" * (10 + len(VARIANT_ORDER))]
    for r in report["rows"]:
        ms, sp, e = r["ms"], r["speedup_vs_dense"], r["max_rel_err"]
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['sparsity']:.2f} | {r['overlap']:.2f} | {r['union_density']:.3f} | "
            f"{r['union_overlap']:.3f} | " + " | ".join(_f(ms.get(v)) for v in VARIANT_ORDER)
            + f" | {_f(sp.get('triton'), '{:.2f}')} | {_f(sp.get('cache'), '{:.2f}')} | {_f(sp.get('gather'), '{:.2f}')}"
            f" | **{r['fastest']}** | " + " / ".join(_f(e.get(k), "{:.1e}") for k in CHECKED) + " |")
    rec = report["recommendation"]
    lines += ["", "## Recommendation (fastest of triton / cache / dense)", "",
              "| shape | M | at | fastest | triton ms | cache ms | dense ms | other points | fastest of all variants |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in rec["per_shape"]:
        others = ", ".join(f"{k}: {v}" for k, v in p["fastest_by_point"].items())
        lines.append(f"| {p['shape']} | {p['M']} | s={p['at']['sparsity']:.2f} o={p['at']['overlap']:.2f} | "
                     f"**{p['fastest']}** | " + " | ".join(_f(p["ms"][k]) for k in CANDIDATES)
                     + f" | {others} | {p['fastest_of_all_variants']} |")
    lines += ["", "Per batch bucket (ms summed over the shapes at the main point): "
              + "; ".join(f"M={m}: **{b['fastest']}**" for m, b in rec["by_batch"].items()), ""]
    if any("wall" in r["ms_by_mode"] and r["ms_by_mode"].get("gpu") for r in report["rows"]):
        lines += ["## Wall time on an idle GPU (ms, incl. Python and launch overhead)", "",
                  "| shape | M | sparsity | overlap | " + " | ".join(VARIANT_ORDER) + " | fastest |",
                  "|" + "---|" * (5 + len(VARIANT_ORDER))]
        for r in report["rows"]:
            w = r["ms_by_mode"]["wall"]
            lines.append(f"| {r['shape']} | {r['M']} | {r['sparsity']:.2f} | {r['overlap']:.2f} | "
                         + " | ".join(_f(w.get(v)) for v in VARIANT_ORDER) + f" | {r.get('fastest_wall', '-')} |")
    return "\n".join(lines) + "\n"


def short_table(rows: list[dict]) -> str:
    head = (f"{'shape':20s} {'M':>2s} {'s':>4s} {'ovl':>4s} {'union':>5s} "
            + " ".join(f"{v[:8]:>8s}" for v in VARIANT_ORDER) + "  fastest  errs")
    out = [head]
    for r in rows:
        out.append(f"{r['shape'][:20]:20s} {r['M']:2d} {r['sparsity']:4.2f} {r['overlap']:4.2f} {r['union_density']:5.3f} "
                   + " ".join(f"{_f(r['ms'].get(v), '{:8.4f}'):>8s}" for v in VARIANT_ORDER)
                   + f"  {r['fastest']:7s}  " + " ".join(f"{e:.0e}" for e in r["max_rel_err"].values())
                   + ("" if r["ok"] else "  FAIL"))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- driver


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/cache_gpu_h100.json")
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--sparsity", type=float, nargs="+", default=SPARSITIES, help="first = main point")
    p.add_argument("--overlap", type=float, nargs="+", default=None,
                   help=f"default: the measured value, then {SECOND_OVERLAP} (first = main point)")
    p.add_argument("--steps", type=int, default=32, help="timed steps (each a new mask)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--flush-mib", type=int, default=256)
    p.add_argument("--head-start-us", type=float, default=200,
                   help="GPU spin after the flush, so that the host issues the timed call ahead of the GPU")
    p.add_argument("--budget-s", type=float, default=150, help="skip the remaining points after this")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph Triton variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, host clock")
    return p.parse_args(argv)


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # the module imports without Triton; only the kernel needs it
        tv = None
    return dict(torch=torch.__version__, triton=tv, cuda=torch.version.cuda, python=platform.python_version())


def points(args, overlaps: list[float]) -> list[tuple[float, float]]:
    """Main point first (so the deadline drops the extras), then the other overlap, then sparsities."""
    return [(s, o) for s in args.sparsity for o in overlaps]


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
        args.steps, args.warmup, args.flush_mib = min(args.steps, 2), min(args.warmup, 1), min(args.flush_mib, 1)
        args.sparsity = args.sparsity[:1]  # and (below) the measured overlap only: the interpreter is slow
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if dev.type == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device: use --dry-run for the CPU check")
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    ovl, ovl_src = measured_overlap()
    overlaps = args.overlap or ([ovl] if args.dry_run else [ovl, SECOND_OVERLAP])
    modes = ["gpu", "wall"] if dev.type == "cuda" else ["wall"]
    flush, flush_t = make_flush(args.flush_mib, args.head_start_us, dev)
    t_start, deadline = time.time(), time.time() + args.budget_s
    log = lambda s: print(f"[{time.time() - t_start:6.1f}s] {s}", flush=True)  # noqa: E731
    log(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else cpu_model()}), "
        f"overlap {overlaps} ({ovl_src}), flush {flush_t}")
    n_steps, rows_max = args.warmup + args.steps, max(args.batches)
    weights = {name: make_weights(K, N, dev, args.seed) for name, (K, N) in shapes.items()}
    out = Path(args.out)
    rows, skipped = [], []
    report = dict(command="python -m benchmarks.cache_gpu " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                  device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({cpu_model()})",
                  **versions(), dry_run=args.dry_run)
    for sparsity, overlap in points(args, overlaps):
        for name, (K, N) in shapes.items():
            if time.time() > deadline:
                skipped.append(dict(shape=name, sparsity=sparsity, overlap=overlap))
                log(f"budget reached: skipping {name} s={sparsity} o={overlap}")
                continue
            masks, xs = build_inputs(K, rows_max, n_steps, sparsity, overlap, args.seed, torch.bfloat16)
            masks, xs = masks.to(dev), xs.to(dev)
            for M in args.batches:
                c = Case(name, masks=masks[:, :M].contiguous(), xs=xs[:, :M].contiguous(), sparsity=sparsity,
                         **weights[name])
                r = dict(shape=name, overlap=overlap, overlap_source=ovl_src if overlap == ovl else "grid",
                         **bench_case(c, args, flush, dev, modes))
                rows.append(r)
                log(f"{name:20s} M={M:2d} s={sparsity:.2f} o={overlap:.2f} union {r['union_density']:.3f} | "
                    + " ".join(f"{k} {v:.4f}" for k, v in r["ms"].items()) + f" ms | fastest {r['fastest']} | "
                    f"err {max(r['max_rel_err'].values()):.1e}" + ("" if r["ok"] else " FAIL")
                    + f" | syncs {r['host_syncs']}")
                del c
            del masks, xs
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            write(report, rows, skipped, args, overlaps, flush_t, modes, out, partial=True)
    write(report, rows, skipped, args, overlaps, flush_t, modes, out, partial=False)
    log(f"wrote {out} and {out.with_suffix('.md')} in {time.time() - t_start:.0f}s")
    print(short_table(rows), flush=True)
    rec = report["recommendation"].get("by_batch", {})
    print("fastest per batch bucket: " + ", ".join(f"M={m}: {b['fastest']}" for m, b in rec.items()), flush=True)
    return report


TIMING_NOTE = {
    "gpu": "CUDA events around each call, L2 flush queued ahead, no sync before the call (host ahead of the "
           "GPU: launch overhead hidden unless the variant itself syncs); median over the timed steps",
    "wall": "host clock around call + synchronize on an idle GPU (includes Python and launch overhead); median",
}
HOST_SYNC_NOTE = (
    "from the code: cache and gather call nonzero (a device-to-host sync) every step, and the cache step "
    "sizes its copies on the host from the diff, so neither can be captured in a CUDA graph; the Triton "
    "kernel and dense make no sync. Measured: row field host_syncs, the synchronising calls of one call "
    "under torch.cuda.set_sync_debug_mode('warn') (null on CPU).")


def write(report: dict, rows: list[dict], skipped: list[dict], args, overlaps: list[float], flush_t: dict,
          modes: list[str], out: Path, partial: bool) -> None:
    """JSON and markdown; also after every point, so a run cut short keeps what it measured."""
    report.update(
        settings=dict(dtype="bfloat16", threshold=THRESHOLD, batches=args.batches, sparsities=args.sparsity,
                      overlaps=overlaps, steps=args.steps, warmup=args.warmup, flush_mib=args.flush_mib,
                      head_start_us=args.head_start_us, **flush_t, modes=modes, timing=TIMING_NOTE[modes[0]],
                      other_timings={m: TIMING_NOTE[m] for m in modes[1:]},
                      masks="independent per batch row: fixed active count per row, `overlap` = fraction of a "
                            "row's active channels active at its previous step; the union over rows is gathered",
                      error="max over steps and batch rows of ||y - ref|| / ||ref||, ref in fp32 on the masked "
                            f"input; ok below {ERR_OK}"),
        host_sync_note=HOST_SYNC_NOTE, partial=partial, skipped=skipped, rows=rows,
        recommendation=recommendations(rows, args.sparsity[0], overlaps[0]) if rows else {})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if rows:
        out.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    main()
