"""Where a decode step's time goes, dense against sparse, in one run on the GPU.

``benchmarks.e2e`` gives tokens/s and the share of the weight-bandwidth limit; this says where
the rest goes. For each variant (dense Inductor with CUDA graphs; the sparse backend at each
sparsity) it times the minimal decode loop of ``benchmarks.e2e`` without the profiler (wall time
per token), then runs the same steps under ``torch.profiler`` and sums the GPU kernels' time by
kind: our sparse kernels, their finishing launches, cuBLAS matmuls, attention, Inductor's fused
kernels (norms, rotary, residual adds, casts), copies and fills. ``idle_us`` is the wall time per
token minus the kernels' busy time: launch gaps and each kernel's ramp up and drain, which CUDA
graphs shrink but do not remove. Kernel counts per token tell how many launches a layer costs.

    python -m benchmarks.e2e_profile --sparsity 0.5 --out $OUT/e2e_profile_h100.json

``--quant int8|int4|torchao-int8`` profiles quantized weights instead (``benchmarks.e2e_quant``'s
models): the bf16 model dense, the quantized copy dense, and the quantized copy sparse at each
sparsity, with the plan calibrated on the bf16 model. Its rows have no ``limit_tok_s``.

Rows: ``{"variant", "batch", "sparsity", "tok_s", "vs_dense", "limit_tok_s", "cudagraph_skips", "wall_us",
"busy_us", "idle_us", "kernels", "by_kind": {kind: {"us", "count"}}, "top": [...]}``, per token;
``top`` lists the kernels that take the most time, by name.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

#: Kernel kinds, first match wins: our Triton kernels by their function names, then the rest.
KINDS: tuple[tuple[str, str], ...] = (
    ("sparse_finish", r"_finish_\w*kernel|_combine_kernel"),
    ("sparse", r"_predicated_kernel|_sparse_linear_kernel|_quant_gemv_kernel|_gate_up_kernel|_expert_\w+_kernel"
               r"|_split_kernel"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemv|gemm|cutlass|xmma|cublas|sm\d+_|splitk|ampere_|hopper_"),
    ("inductor", r"^triton_|^triton__"),
    ("copy_fill", r"memcpy|memset|copy|fill|elementwise_kernel|vectorized_"),
)


def kind_of(name: str) -> str:
    """The kind of one GPU kernel, by name (``other`` if none matches)."""
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, name if kind.startswith("sparse") else low):
            return kind
    return "other"


def summarize(kernels: Iterable[tuple[str, float]], tokens: int, wall_us_per_token: float) -> dict:
    """Per-token busy time and count by kind from (kernel name, microseconds) records."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    by_kind: dict[str, dict[str, float]] = {}
    busy = 0.0
    count = 0
    for name, us in kernels:
        k = by_kind.setdefault(kind_of(name), {"us": 0.0, "count": 0})
        k["us"] += us / tokens
        k["count"] += 1 / tokens
        busy += us
        count += 1
    busy /= tokens
    return {"wall_us": wall_us_per_token, "busy_us": busy, "idle_us": wall_us_per_token - busy,
            "kernels": count / tokens, "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["us"])),
            "top": top_kernels(kernels, tokens)}


def top_kernels(kernels: Iterable[tuple[str, float]], tokens: int, n: int = 20) -> list[dict]:
    """The ``n`` kernels (by name) that take the most time per token: what a fusion should target."""
    by_name: dict[str, list[float]] = {}
    for name, us in kernels:
        t = by_name.setdefault(name, [0.0, 0])
        t[0] += us
        t[1] += 1
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"name": name[:120], "kind": kind_of(name), "us": us / tokens, "count": c / tokens,
             "mean_us": us / c} for name, (us, c) in rows]


def profile_step_kernels(model, backend, ids: torch.Tensor, steps: int) -> tuple[list[tuple[str, float]], float]:
    """GPU kernels of ``steps`` decode steps of the minimal loop, and its wall time per token
    (timed first without the profiler, which slows the host side)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    b, n = ids.shape
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=backend, fullgraph=True)
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 1)

    def run(prof=None) -> float:
        cache.reset()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device=ids.device))
            tok = out.logits[:, -1:].argmax(-1)
            pos = torch.tensor([n], device=ids.device)
            torch.cuda.synchronize()
            if prof is not None:
                prof.start()
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = step(input_ids=tok, past_key_values=cache, cache_position=pos).logits[:, -1:].argmax(-1)
                pos += 1
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            if prof is not None:
                prof.stop()
        return t

    run()
    run()
    wall = sorted(run() for _ in range(3))[1] / (steps * b) * 1e6
    prof = profile(activities=[ProfilerActivity.CUDA])
    run(prof)
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return kernels, wall


QUANT = ("int8", "int4", "torchao-int8")


def quantized_copy(args, quant: str):
    """The same random weights (same seed) quantized as ``benchmarks.e2e_quant`` does."""
    import actsparse
    from actsparse.models import shaped

    model = shaped(args.model, dtype=torch.bfloat16, device="cuda", num_layers=args.layers)
    if quant == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        head = model.get_output_embeddings()
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head)
        return model
    return actsparse.quantize(model, bits=int(quant[3:]))


def quant_variants(sparsities, quant: str) -> list[tuple[str, float | None, bool]]:
    """(variant, sparsity, on the quantized copy) for ``--quant``: bf16 dense first (the
    baseline of ``vs_dense``), the quantized copy dense, then sparse at each sparsity."""
    return ([("dense", None, False), (f"dense-{quant}", None, True)]
            + [(f"sparse-{quant}-{s:.0%}", s, True) for s in sparsities])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e_profile", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed and profiled run")
    p.add_argument("--ablate", nargs="*", choices=["gqa", "fuse"], default=["gqa", "fuse"],
                   help="rewrites to measure by their absence: each sparse row again without it (gqa "
                        "also adds the dense model through the backend with an empty plan, the "
                        "rewrite's own gain)")
    p.add_argument("--quant", choices=QUANT, default=None,
                   help="profile a quantized copy (dense and sparse) beside the bf16 model instead of the ablations")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the profile is of GPU kernels)")
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be at least 1")

    import actsparse
    from actsparse.models import shaped
    from benchmarks.e2e import _dense_backend, ablation_variants, calibrate_on_tokens
    from benchmarks.harness import cudagraph_skips, write_json
    from benchmarks.weight_limit import bytes_per_step, gemv_bandwidth, limit_tok_s

    res = {"gpu": torch.cuda.get_device_name(),
           "command": "python -m benchmarks.e2e_profile " + " ".join(sys.argv[1:] if argv is None else argv),
           "torch": torch.__version__, "model": args.model, "layers": args.layers, "dtype": "bfloat16",
           "kinds": {k: pat for k, pat in KINDS}, "rows": []}
    out = Path(args.out)
    model = shaped(args.model, dtype=torch.bfloat16, device="cuda", num_layers=args.layers)
    res["gemv_bandwidth_Bps"] = gemv_bw = gemv_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (1, 512), device="cuda", generator=g)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, 32), device="cuda", generator=g)
    dense_tok_s = None
    plans: dict[float, actsparse.SparsityPlan] = {0.0: actsparse.SparsityPlan()}
    if args.quant:
        plans.update({s: calibrate_on_tokens(model, calib, s) for s in args.sparsity})  # on the bf16 model
        qmodel = quantized_copy(args, args.quant)
        variants = [(name, s, {}, qmodel if on_q else model) for name, s, on_q in quant_variants(args.sparsity, args.quant)]
    else:
        variants = [(name, s, opts, model) for name, s, opts in ablation_variants(args.sparsity, args.ablate)]
    for name, s, opts, m in variants:
        plan = None
        if s is not None:
            if s not in plans:
                plans[s] = calibrate_on_tokens(m, calib, s)
            plan = plans[s]
            if m is model:  # quantized weights are stored input-major already
                actsparse.prepare(m, plan)
        backend = actsparse.backend(plan, cudagraphs=True, **opts) if plan is not None else _dense_backend()
        skips0 = cudagraph_skips()
        kernels, wall = profile_step_kernels(m, backend, ids, args.steps)
        row = summarize(kernels, args.steps * args.batch, wall)
        tok_s = 1e6 / wall
        dense_tok_s = dense_tok_s or tok_s
        row = {"variant": name, "batch": args.batch, "options": opts,
               "sparsity": s or 0.0, "tok_s": tok_s, "vs_dense": tok_s / dense_tok_s,
               "limit_tok_s": None if m is not model else limit_tok_s(bytes_per_step(m, plan, args.batch), gemv_bw,
                                                                      args.batch),
               "cudagraph_skips": cudagraph_skips() - skips0, **row}
        res["rows"].append(row)
        write_json(out, res)
        kinds = "  ".join(f"{k} {v['us']:.0f}us/{v['count']:.0f}" for k, v in row["by_kind"].items())
        print(f"{row['variant']:>11}: {tok_s:7.1f} tok/s x{row['vs_dense']:.2f} | wall {wall:.0f} us = busy "
              f"{row['busy_us']:.0f} + idle {row['idle_us']:.0f} | {row['kernels']:.0f} kernels | {kinds}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
