"""Isolated CPU benchmark of the cached-weight index step, and of the full sparse step.

    python -m benchmarks.index_step --out benchmarks/results/index_step_cpu.json

*Index step* (what sparse_transformers reported as 29.89 ms -> 4.46 ms, 6.7x): given the next
mask, produce the compact buffer of active weight rows. ``index_select`` re-gathers every active
row (into a preallocated buffer; ``index_select_alloc`` allocates it per step as naive code does);
``cache`` is :meth:`WeightRowCache.step` (diff + copy of the changed rows only).

*Full step*: the index step plus the multiply, against dense ``F.linear(x, W)``:
``index_select_mm``, ``cache_mm`` (cache step + ``x[:, idx] @ buf``), and ``op`` (the custom op
``actsparse::cached_sparse_linear``, which also computes the mask from x).

Masks: a fixed number of active rows (``1 - sparsity``); ``overlap`` is the fraction of a step's
active rows that were active at the previous step (the rest are drawn from the inactive rows).
Every timed step gets a new mask of the sequence; methods are interleaved step by step so that
machine noise hits them alike. In the ``cold`` state 64 MiB are read before each timed call,
evicting the last-level cache as the other layers' weight streams do in a decoder; ``hot``
skips that. Minimum and median over the steps are both stored (``--stat`` picks the one behind
the speedups: min by default, see :func:`stat_ms`).

Threads: when the CPU is saturated by other processes, every parallel region with as many
threads as cores can wait a whole scheduler tick for its second thread (index_select of 1.7 MB:
12 ms instead of 0.1 ms on the 2-core machine here). ``OMP_WAIT_POLICY=PASSIVE`` (set below
unless already set; it only takes effect before torch is imported, which holds for
``python -m``) helps; on a busy machine measure with ``--threads 1``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from actsparse.ops import cached_sparse_linear as cached_ops  # noqa: E402
from actsparse.kernels.weight_cache import WeightRowCache  # noqa: E402

# name -> (rows R, cols C, what it stands for). Input-sparse sites: rows are input channels of
# W^T (one row = one input channel's weights for every output). fp32 by default.
SHAPES = {
    "smollm2.down": (1536, 576, "SmolLM2-135M down_proj: W_down^T [intermediate 1536, hidden 576]"),
    "smollm2.gate_up": (576, 3072, "SmolLM2-135M gate+up (shared input): [W_gate; W_up]^T [576, 2*1536]"),
    "smollm2.qkv": (576, 960, "SmolLM2-135M q+k+v (shared input): [576, 576+192+192]"),
    "smollm2.o": (576, 576, "SmolLM2-135M o_proj: W_o^T [576, 576]"),
    "llama3.2-3b.down": (8192, 3072, "Llama-3.2-3B down_proj: W_down^T [intermediate 8192, hidden 3072]"),
    "llama3.2-3b.neuron": (
        8192,
        9216,
        "Llama-3.2-3B MLP by neuron (sparse_transformers' layout, index-only): per intermediate "
        "neuron its gate row, up row and down column, [8192, 3*3072]",
    ),
}
FULL_STEP = {"smollm2.down", "smollm2.gate_up", "smollm2.qkv", "smollm2.o", "llama3.2-3b.down"}
DEFAULT_SHAPES = list(SHAPES)
DEFAULT_OVERLAPS = [0.5, 0.7, 0.8, 0.9, 0.95]
THRESHOLD = 1.0


def mask_sequence(R: int, steps: int, active: int, overlap: float, g: torch.Generator) -> list[torch.Tensor]:
    """``steps`` masks of ``active`` rows; each keeps ``round(overlap * active)`` of the last."""
    keep = round(overlap * active)
    prev = torch.zeros(R, dtype=torch.bool)
    prev[torch.randperm(R, generator=g)[:active]] = True
    out = [prev]
    for _ in range(steps - 1):
        on = prev.nonzero().squeeze(1)
        off = (~prev).nonzero().squeeze(1)
        fresh = min(active - keep, off.numel())
        m = torch.zeros(R, dtype=torch.bool)
        m[on[torch.randperm(on.numel(), generator=g)[: active - fresh]]] = True
        m[off[torch.randperm(off.numel(), generator=g)[:fresh]]] = True
        out.append(m)
        prev = m
    return out


def x_for_mask(mask: torch.Tensor, g: torch.Generator, dtype) -> torch.Tensor:
    """An activation row whose ``|x| > THRESHOLD`` is exactly ``mask``."""
    n = torch.randn(mask.numel(), generator=g)
    big = torch.sign(n) * (THRESHOLD + 0.1 + n.abs())
    small = torch.rand(mask.numel(), generator=g) * 1.8 * THRESHOLD - 0.9 * THRESHOLD
    return torch.where(mask, big, small).to(dtype).unsqueeze(0)


def timed_interleaved(methods: dict, inputs: list, warmup: int, flush) -> dict[str, list[float]]:
    """Run each method on each input in turn (flushing before every call); seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    for i, inp in enumerate(inputs):
        for name, fn in methods.items():
            flush(i)
            t0 = time.perf_counter()
            fn(inp)
            t1 = time.perf_counter()
            if i >= warmup:
                times[name].append(t1 - t0)
    return times


def median_ms(ts: list[float]) -> float:
    s = sorted(ts)
    n = len(s)
    return 1e3 * (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


def stat_ms(ts: list[float], stat: str) -> float:
    """``median``, or ``min`` (best of N: on a shared, saturated CPU the median catches
    scheduler stalls of whole ticks; the minimum is the uncontended time)."""
    return median_ms(ts) if stat == "median" else 1e3 * min(ts)


def bench_one(name, R, C, overlap, sparsity, args, flush, full: bool, dtype) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    active = round((1 - sparsity) * R)
    steps = args.warmup + args.repeats
    masks = mask_sequence(R, steps, active, overlap, g)
    W = torch.randn(C, R, generator=g).to(dtype)  # nn.Linear layout [out, in]
    Wt = W.t().contiguous()  # input-major rows
    out = torch.empty(R, C, dtype=dtype)

    def sel(m):
        return torch.index_select(Wt, 0, m.nonzero().squeeze(1), out=out[: int(active)])

    def sel_alloc(m):
        return Wt.index_select(0, m.nonzero().squeeze(1))

    cache = WeightRowCache(Wt)
    copied = []

    def cache_step(m):
        cache.step(m)
        copied.append(cache.rows_copied_last)

    idx_t = timed_interleaved(
        {"index_select": sel, "index_select_alloc": sel_alloc, "cache": cache_step}, masks, args.warmup, flush
    )
    res = {
        "shape": name,
        "rows": R,
        "cols": C,
        "overlap": overlap,
        "sparsity": sparsity,
        "active_rows": active,
        "rows_copied_median": sorted(copied[args.warmup :])[len(copied[args.warmup :]) // 2],
        "index_ms": {k: stat_ms(v, args.stat) for k, v in idx_t.items()},
        "index_ms_median": {k: median_ms(v) for k, v in idx_t.items()},
        "index_ms_min": {k: 1e3 * min(v) for k, v in idx_t.items()},
    }
    ims = res["index_ms"]
    res["index_speedup"] = {
        "vs_index_select": ims["index_select"] / ims["cache"],
        "vs_index_select_alloc": ims["index_select_alloc"] / ims["cache"],
    }
    del cache
    if full:
        xs = [(m, x_for_mask(m, g, dtype)) for m in masks]
        cache2 = WeightRowCache(Wt)
        site = abs(hash((name, overlap, sparsity))) % (2**31)
        cached_ops.release_all()

        def dense(mx):
            return F.linear(mx[1], W)

        def sel_mm(mx):
            m, x = mx
            idx = m.nonzero().squeeze(1)
            buf = torch.index_select(Wt, 0, idx, out=out[: idx.numel()])
            return torch.mm(x.index_select(1, idx), buf)

        def cache_mm(mx):
            m, x = mx
            buf, idx = cache2.step(m)
            return torch.mm(x.index_select(1, idx), buf)

        def op(mx):
            return cached_ops.cached_sparse_linear(mx[1], W, None, THRESHOLD, site)

        from actsparse.kernels import cpu as native_cpu

        methods = {"dense": dense, "index_select_mm": sel_mm, "cache_mm": cache_mm, "op": op}
        if native_cpu.load() is not None:
            def native(mx):  # the backend's CPU decode path: reads active rows once, no copy
                return native_cpu.input_sparse_linear(mx[1], Wt, THRESHOLD)
            methods["native"] = native
        op(xs[0])  # build the site's prepared copy outside the timed loop
        full_t = timed_interleaved(methods, xs, args.warmup, flush)
        fms = {k: stat_ms(v, args.stat) for k, v in full_t.items()}
        res["full_ms"] = fms
        res["full_ms_median"] = {k: median_ms(v) for k, v in full_t.items()}
        res["full_ms_min"] = {k: 1e3 * min(v) for k, v in full_t.items()}
        res["full_speedup_vs_dense"] = {k: fms["dense"] / fms[k] for k in methods if k != "dense"}
        # the multiply the same for both paths; check they agree
        m, x = xs[-1]
        ref = F.linear(x * m, W)
        y = cache_mm(xs[-1])
        res["max_abs_err_vs_masked_dense"] = float((y - ref).abs().max())
        res["memory_bytes"] = {
            "weight": W.numel() * W.element_size(),
            "prepared_input_major_copy": Wt.numel() * Wt.element_size(),
            "cache": cache2.nbytes,
            "cache_buffer": cache2.buffer_nbytes,
        }
        cached_ops.release_all()
    return res


def bench_layout(name, R, C, overlap, sparsity, args, flush, dtype) -> dict:
    """Cache step from the prepared input-major copy vs from the strided ``W.t()`` view."""
    g = torch.Generator().manual_seed(args.seed)
    active = round((1 - sparsity) * R)
    masks = mask_sequence(R, args.warmup + args.layout_repeats, active, overlap, g)
    W = torch.randn(C, R, generator=g).to(dtype)
    caches = {
        "input_major_copy": WeightRowCache.from_weight(W, input_major=True),
        "strided_view": WeightRowCache.from_weight(W, input_major=False),
    }
    t = timed_interleaved({k: c.step for k, c in caches.items()}, masks, args.warmup, flush)
    ms = {k: stat_ms(v, args.stat) for k, v in t.items()}
    return {"shape": name, "overlap": overlap, "sparsity": sparsity, "cache_step_ms": ms,
            "strided_slowdown": ms["strided_view"] / ms["input_major_copy"]}


def load_overlap_json(path: str) -> list[dict]:
    """Measured overlaps: ``{"name": 0.83, ...}``, or ``{"sites": {...}}`` / ``{"overlaps": {...}}``
    whose values are floats or ``{"overlap": o, "sparsity": s?, "rows": R?, "cols": C?}``.
    Entries with rows/cols are benchmarked at their own shape, the others at every ``--shapes``.
    A multi-variant result of ``benchmarks.overlap`` (``"rows"`` of variants) gives each
    variant's MLP-down overlap and MLP sparsity."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and isinstance(data.get("rows"), list) and data["rows"] and "variant" in data["rows"][0]:
        return [{"name": r["variant"], "overlap": float(r["overlap_mlp_down"]), "sparsity": float(r["mlp_sparsity"])}
                for r in data["rows"] if r.get("overlap_mlp_down") is not None]
    if isinstance(data, dict):
        for key in ("sites", "overlaps"):
            if key in data and isinstance(data[key], dict):
                data = data[key]
                break
    entries = []
    for name, v in data.items():
        e = {"overlap": float(v)} if isinstance(v, (int, float)) else dict(v)
        e["name"] = name
        entries.append(e)
    return entries


def plot(results: list[dict], path: Path, stat: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by_shape: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if r.get("source") == "grid":
            by_shape.setdefault((r["shape"], r["cache_state"]), []).append(r)
    colors: dict[str, str] = {}
    for (shape, state), rs in by_shape.items():
        rs = sorted(rs, key=lambda r: r["overlap"])
        ov = [100 * r["overlap"] for r in rs]
        color = colors.setdefault(shape, f"C{len(colors)}")
        style = dict(marker="o", color=color, ls="-" if state == "cold" else ":",
                     label=f"{shape} ({state})")
        axes[0].plot(ov, [r["index_speedup"]["vs_index_select"] for r in rs], **style)
        if "full_ms" in rs[0]:
            axes[1].plot(ov, [r["full_speedup_vs_dense"]["cache_mm"] for r in rs], **style)
    axes[0].axhline(6.7, ls="--", c="gray", lw=1, label="published 6.7x")
    axes[0].set_yscale("log")
    axes[0].set_title("isolated index step: index_select / cache step")
    axes[1].axhline(1.0, ls="--", c="gray", lw=1)
    axes[1].set_title("full step (cache + matmul) vs dense F.linear")
    for ax in axes:
        ax.set_xlabel("overlap between consecutive masks (%)")
        ax.set_ylabel("speedup (x)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"CPU, {torch.get_num_threads()} threads, {results[0]['sparsity']:.0%} sparsity ({stat})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/index_step_cpu.json")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    p.add_argument("--overlap", type=float, nargs="+", default=DEFAULT_OVERLAPS)
    p.add_argument("--overlap-json", help="measured per-site overlaps (see load_overlap_json)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=150)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--layout-repeats", type=int, default=30)
    p.add_argument("--layout-overlap", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--flush-mb", type=int, default=64, help="MiB written before each cold call")
    p.add_argument("--cache-state", nargs="+", default=["cold", "hot"], choices=["cold", "hot"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stat", default="min", choices=["min", "median"],
                   help="statistic behind *_ms and the speedups (both are stored)")
    p.add_argument("--no-full", action="store_true", help="index step only")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    scratch = torch.ones(args.flush_mb << 17, dtype=torch.int64) if args.flush_mb else None

    def cold(i):
        # Evict by reading (as the other layers' weight streams do): a write-flush would leave
        # dirty lines whose write-back the next timed call pays.
        if scratch is not None:
            scratch.max()

    def hot(i):
        pass

    flushes = {"cold": cold, "hot": hot}

    load0 = os.getloadavg()
    t_start = time.time()
    results = []
    jobs = [(s, SHAPES[s][0], SHAPES[s][1], o, args.sparsity, "grid") for s in args.shapes for o in args.overlap]
    if args.overlap_json:
        for e in load_overlap_json(args.overlap_json):
            sp = float(e.get("sparsity", args.sparsity))
            if "rows" in e and "cols" in e:
                jobs.append((e["name"], int(e["rows"]), int(e["cols"]), float(e["overlap"]), sp, "measured"))
            else:
                jobs += [(s, SHAPES[s][0], SHAPES[s][1], float(e["overlap"]), sp, "measured:" + e["name"])
                         for s in args.shapes]
    for (name, R, C, o, sp, source), state in [(j, st) for st in args.cache_state for j in jobs]:
        full = not args.no_full and (name in FULL_STEP or source == "measured")
        r = bench_one(name, R, C, o, sp, args, flushes[state], full, dtype)
        r["source"] = source
        r["cache_state"] = state
        results.append(r)
        line = (f"{state:4s} {name:22s} R={R:5d} C={C:5d} overlap={o:.2f}  index_select {r['index_ms']['index_select']:8.3f} ms"
                f"  cache {r['index_ms']['cache']:8.3f} ms  -> {r['index_speedup']['vs_index_select']:5.2f}x")
        if "full_ms" in r:
            f = r["full_ms"]
            line += (f" | dense {f['dense']:7.3f}  sel+mm {f['index_select_mm']:7.3f}  cache+mm {f['cache_mm']:7.3f}"
                     f"  op {f['op']:7.3f}" + (f"  native {f['native']:7.3f}" if "native" in f else "")
                     + f" ms -> {r['full_speedup_vs_dense']['cache_mm']:4.2f}x")
        print(line, flush=True)
    layout = [bench_layout(s, SHAPES[s][0], SHAPES[s][1], args.layout_overlap, args.sparsity, args,
                           flushes[args.cache_state[0]], dtype) | {"cache_state": args.cache_state[0]}
              for s in args.shapes if s in FULL_STEP]
    for lr in layout:
        print(f"layout {lr['shape']:22s} {lr['cache_step_ms']}  strided view {lr['strided_slowdown']:.1f}x slower",
              flush=True)

    report = {
        "command": "python -m benchmarks.index_step " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "parallel_backend": torch.__config__.parallel_info().splitlines()[-1].strip(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "wall_s": round(time.time() - t_start, 1),
        },
        "settings": {
            "dtype": args.dtype,
            "sparsity": args.sparsity,
            "overlaps": args.overlap,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "flush_mb": args.flush_mb,
            "cache_states": args.cache_state,
            "statistic": f"{args.stat} of per-call wall time (index_ms/full_ms and speedups); "
            "index_ms_median/_min and full_ms_median/_min hold both; methods interleaved step by step",
            "overlap_definition": "fraction of a step's active rows active at the previous step",
        },
        "note": args.note,
        "shapes": {s: {"rows": SHAPES[s][0], "cols": SHAPES[s][1], "note": SHAPES[s][2]} for s in args.shapes},
        "results": results,
        "layout": layout,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if not args.no_plot:
        plot(results, out.with_suffix(".png"), args.stat)
    return report


if __name__ == "__main__":
    main()
