"""GPU probe: where the time of a batched or end-to-end sparse decode step goes.

Two measurements, in one call:

1. ``layouts``: per Llama-3-8B layer shape and batch rows M, cuBLAS on the row-major weight
   (the dense model), cuBLAS on the input-major storage the sparse kernel needs, the masking
   alone, the current dense fallback (mask, then cuBLAS on input-major), and the Triton
   kernel with nothing to skip. Says whether the batch-decode loss is the layout, the
   masking launches, or the kernel.
2. ``profile``: one decode step of a 32-layer Llama-3-8B-shaped bf16 model under CUDA graphs,
   dense Inductor against the sparse backend at 50%, summed kernel time by kernel name
   (torch.profiler) and the wall time per step: what besides the linears costs time.

    PYTHONPATH=. python3 benchmarks/studies/gpu_probe.py --out $OUT/gpu_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch

from benchmarks.harness import masked_ref

from actsparse.ops.dense import masked_linears
import torch.nn.functional as F

from benchmarks.harness import bench_calls, threshold_for, weight_copies

SHAPES = {"gate_up": (4096, 14336), "down": (14336, 4096), "q_o": (4096, 4096)}


def layouts(batches, log) -> list[dict]:
    from actsparse.kernels.triton import sparse_gemv as sg

    rows = []
    for name, (K, N) in SHAPES.items():
        n_copies = weight_copies(K * N * 2)
        wr = [(torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(n_copies)]
        wi = [w.t().contiguous().t() for w in wr]
        calls = max(24, n_copies)
        for M in batches:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            t5 = threshold_for(0.5)
            fns = {
                "cublas_row_major": lambda i: F.linear(xs[i % 4], wr[i % n_copies]),
                "cublas_input_major": lambda i: F.linear(xs[i % 4], wi[i % n_copies]),
                "mask_only": lambda i: masked_ref(xs[i % 4], t5),
                "fallback_mask_cublas_im": lambda i: masked_linears(xs[i % 4], [wi[i % n_copies]], [None], [t5]),
                "triton_s0": lambda i: sg.launch_sparse_linear(xs[i % 4], [wi[i % n_copies]], [None], [0.0],
                                                               sparsity_hint=0.0)[0],
                "triton_s50": lambda i: sg.launch_sparse_linear(xs[i % 4], [wi[i % n_copies]], [None], [t5],
                                                                sparsity_hint=0.5)[0],
            }
            row = {"shape": name, "K": K, "N": N, "M": M}
            for key, fn in fns.items():
                row[key + "_us"] = bench_calls([lambda i=i, fn=fn: fn(i) for i in range(calls)])
            rows.append(row)
            log(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        del wr, wi
        torch.cuda.empty_cache()
    return rows


def _kernel_table(prof, steps: int) -> list[dict]:
    tot = defaultdict(float)
    cnt = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name] += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
            cnt[ev.name] += 1
    table = [{"kernel": k[:120], "us_per_step": v / steps, "calls_per_step": cnt[k] / steps}
             for k, v in tot.items()]
    return sorted(table, key=lambda r: -r["us_per_step"])


def _host_table(prof, steps: int) -> list[dict]:
    """Host-side events (runtime API calls, Python ops) per step, by name: what the host does
    to issue one step."""
    tot = defaultdict(float)
    cnt = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CPU:
            tot[ev.name] += ev.self_cpu_time_total
            cnt[ev.name] += 1
    table = [{"event": k[:120], "self_us_per_step": v / steps, "calls_per_step": cnt[k] / steps}
             for k, v in tot.items()]
    return sorted(table, key=lambda r: -r["self_us_per_step"])[:40]


def profile(sparsity: float, batch: int, layers: int | None, log, variants=("dense", "sparse"),
            cprofile: bool = False) -> dict:
    """Per variant: wall time per step with a host sync per step (``torch.tensor(pos)``, a
    pageable copy, waits for the GPU) and without (position advanced on the device), the host
    time to issue one step, and the kernels' summed time per step.

    Variants: ``dense`` (Inductor), ``empty`` (the sparse backend with an empty plan: no site
    rewritten, so any difference from dense is the backend's own overhead), ``sparse``."""
    import actsparse
    from benchmarks.e2e import _dense_backend, calibrate_on_tokens
    from actsparse.models import shaped
    from transformers import StaticCache

    model = shaped("llama3-8b", dtype=torch.bfloat16, device="cuda", num_layers=layers)
    g = torch.Generator(device="cuda").manual_seed(0)
    calib = torch.randint(0, 128000, (1, 512), device="cuda", generator=g)
    plan = calibrate_on_tokens(model, calib, sparsity)
    ids = torch.randint(0, 128000, (batch, 32), device="cuda", generator=g)
    out = {}
    for variant in variants:
        if variant == "sparse":
            actsparse.prepare(model, plan)
            be = actsparse.backend(plan, cudagraphs=True)
        elif variant == "empty":
            be = actsparse.backend(actsparse.SparsityPlan(), cudagraphs=True)
        else:
            be = _dense_backend()
        name = f"{variant}-{sparsity:.0%}" if variant == "sparse" else variant
        torch._dynamo.reset()
        step = torch.compile(model.forward, backend=be, fullgraph=True)
        n = ids.shape[1]
        cache = StaticCache(config=model.config, max_cache_len=n + 128)
        with torch.no_grad():
            o = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device="cuda"))
            state = {"tok": o.logits[:, -1:].argmax(-1), "pos": n, "dpos": torch.tensor([n], device="cuda")}

            def one(device_pos=False):
                pos = state["dpos"] if device_pos else torch.tensor([state["pos"]], device="cuda")
                logits = step(input_ids=state["tok"], past_key_values=cache, cache_position=pos).logits
                state["tok"] = logits[:, -1:].argmax(-1)
                state["pos"] += 1
                state["dpos"] += 1

            for _ in range(6):
                one()
            state["dpos"].fill_(state["pos"])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(16):
                one()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 16
            state["dpos"].fill_(state["pos"])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(16):
                one(device_pos=True)
            t_issue = (time.perf_counter() - t0) / 16
            torch.cuda.synchronize()
            wall_async = (time.perf_counter() - t0) / 16
            state["pos"] = int(state["dpos"].item())
            if cprofile:  # the host's Python per step, with a sync per step (as in generate)
                import cProfile
                import io
                import pstats
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(16):
                    one()
                torch.cuda.synchronize()
                pr.disable()
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
                text = buf.getvalue()
                log(text[-6000:])
            rec = {"wall_ms_per_step": wall * 1e3, "wall_ms_per_step_no_sync": wall_async * 1e3,
                   "host_issue_ms_per_step": t_issue * 1e3}
            if variant != "empty":
                steps = 8
                from torch.profiler import ProfilerActivity, profile as tprof
                with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        one()
                    torch.cuda.synchronize()
                table = _kernel_table(prof, steps)
                rec.update(kernel_us_per_step=sum(r["us_per_step"] for r in table), kernels=table[:40],
                           host=_host_table(prof, steps))
            from torch._dynamo.utils import counters
            rec["inductor_counters"] = {k: dict(v) for k, v in counters.items()
                                        if k in ("inductor", "stats") and v}
        out[name] = rec
        log(f"{name}: wall {wall * 1e3:.2f} ms/step (sync per step), {wall_async * 1e3:.2f} (no sync), "
            f"host issue {t_issue * 1e3:.2f} ms, kernels {rec.get('kernel_us_per_step', float('nan')) / 1e3:.2f} ms")
        for r in rec.get("kernels", [])[:4]:
            log(f"   {r['us_per_step']:8.1f} us  x{r['calls_per_step']:5.0f}  {r['kernel'][:90]}")
        for r in rec.get("host", [])[:12]:
            log(f"   host {r['self_us_per_step']:8.1f} us  x{r['calls_per_step']:5.0f}  {r['event'][:90]}")
        log("   counters: " + json.dumps(rec["inductor_counters"])[:600])
        from torch._dynamo.utils import counters
        counters.clear()
        del step, cache
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--skip-layouts", action="store_true")
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument("--profile-batches", type=int, nargs="+", default=[1])
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--cprofile", action="store_true", help="print the host's Python profile of 16 steps")
    p.add_argument("--variants", nargs="+", default=["dense", "sparse"], choices=["dense", "empty", "sparse"])
    args = p.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python3 benchmarks/studies/gpu_probe.py " + " ".join(sys.argv[1:])}

    def log(msg):
        print(msg, flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    if not args.skip_layouts:
        res["layouts"] = layouts(args.batches, log)
        save()
    if not args.skip_profile:
        res["profile"] = {}
        for b in args.profile_batches:
            res["profile"][f"batch{b}"] = profile(0.5, b, args.layers, log, args.variants, args.cprofile)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
