"""Quantized sparse GEMV per shape: our int8 / int4 kernel against cuBLAS bf16 and the dense int
weight's dequantise-and-matmul, at each sparsity and batch.

Llama-3-8B linears (gate/up 4096->14336, down 14336->4096, q/o 4096->4096, k/v 4096->1024), bf16
activations, thresholds at the |x| quantile of each sparsity. Times are per call from a CUDA graph
with L2 flushed before each call (``kernels/triton/_runtime.graph_bench``); each case is checked
against the pure-torch reference first.

    python -m benchmarks.kernels_quant --out $OUT/kernels_quant_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"gate/up": (4096, 14336), "down": (14336, 4096), "q/o": (4096, 4096), "k/v": (4096, 1024)}
TINY = {"tiny": (64, 46)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.25, 0.4, 0.5, 0.6])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--config-sets", nargs="+", default=["all"],
                   help="tune over each of these config sets in turn (quant_gemv.CONFIG_SETS: all, predicated, "
                        "compact), one row each")
    p.add_argument("--tiny", action="store_true", help="one tiny shape on the CPU (under TRITON_INTERPRET=1)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def timer(fn, cuda: bool) -> float:
    """Microseconds per call."""
    if cuda:
        from actsparse.kernels.triton._runtime import graph_bench

        return 1e3 * graph_bench(fn)
    fn()
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def chosen_config(batch: int, config_set: str = "all") -> dict | None:
    """The config the autotuner last chose for this row count (None in the interpreter)."""
    from actsparse.kernels.triton import quant_gemv as qg

    best = getattr(qg._TUNERS.get((qg.rows_pad(batch), config_set)), "best_config", None)
    if best is None:
        return None
    return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}


def main(argv=None) -> int:
    args = parse_args(argv)
    from actsparse.kernels.triton import quant_gemv as qg
    from actsparse.ops.quant_linear import quant_linear_dense
    from actsparse.ops.reference import quant_sparse_linear_reference
    from actsparse.quant.storage import quantize_weight

    cuda = torch.cuda.is_available() and not args.tiny
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    res = {"gpu" if cuda else "cpu": torch.cuda.get_device_name() if cuda else "cpu",
           "command": "python -m benchmarks.kernels_quant " + " ".join(argv if argv is not None else sys.argv[1:]),
           "unit": "us per call", "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=dev).manual_seed(0)
    for knob in ("recompile_limit", "cache_size_limit"):  # one compiled dequant+matmul per shape and width
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    dense_q = torch.compile(quant_linear_dense) if cuda else quant_linear_dense
    for name, (k, n) in (TINY if args.tiny else SHAPES).items():
        w = (torch.randn(n, k, device=dev, generator=g) * k**-0.5).to(dtype)
        qws = {b: quantize_weight(w, b, (args.group_size if k % args.group_size == 0 else 32) if b == 4 else None)
               for b in args.bits}
        for batch in args.batches:
            x = torch.randn(batch, k, device=dev, generator=g).to(dtype)
            t_bf16 = timer(lambda: F.linear(x, w), cuda)
            for bits, qw in qws.items():
                qargs = (qw.qweight, qw.scales, qw.offsets, None)
                t_dq = timer(lambda: dense_q(x, *qargs, bits, qw.group_size), cuda)
                for s, cset in itertools.product(args.sparsity, args.config_sets):
                    t = float(torch.quantile(x.abs().float().flatten(), s)) if s > 0 else -1.0
                    with qg.config_set(cset):
                        got = qg.launch_quant_sparse_linear(x, *qargs, t, bits, qw.group_size, sparsity_hint=s)
                        ref = quant_sparse_linear_reference(x, *qargs, t, False, bits, qw.group_size)
                        err = float((got.float() - ref.float()).norm() / (ref.float().norm() + 1e-9))
                        t_sp = timer(lambda: qg.launch_quant_sparse_linear(x, *qargs, t, bits, qw.group_size,
                                                                           sparsity_hint=s), cuda)
                    row = {"shape": name, "k": k, "n": n, "bits": bits, "batch": batch, "sparsity": s,
                           "config_set": cset, "us_sparse": t_sp, "us_bf16_cublas": t_bf16,
                           "us_dense_dequant": t_dq, "vs_bf16": t_bf16 / t_sp, "vs_dense_quant": t_dq / t_sp,
                           "ideal_vs_bf16": 16 / bits / max(1 - s, 1e-9), "rel_err": err,
                           "config": chosen_config(batch, cset)}
                    res["rows"].append(row)
                    out.write_text(json.dumps(res, indent=1))
                    print(f"{name:>8} b{batch} int{bits} {s:4.0%} {cset:>10}: {t_sp:7.1f} us  x{row['vs_bf16']:.2f} "
                          f"vs bf16 (ideal x{row['ideal_vs_bf16']:.1f})  x{row['vs_dense_quant']:.2f} vs dequant+mm  "
                          f"err {err:.1e}", flush=True)
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
