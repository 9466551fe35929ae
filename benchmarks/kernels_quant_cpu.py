"""CPU kernel table for quantized input-sparse linears, one token row: the native int8 / int4
kernel (``actsparse/kernels/cpu/quant_input_sparse.cpp``) against dense fp32 and dense int8.

    python -m benchmarks.kernels_quant_cpu --out benchmarks/results/kernels_quant_cpu.json

Variants per shape (K inputs -> N outputs, fp32 activations, random weights):
``dense fp32`` (``F.linear``), ``dense int8 (dequantise + matmul)`` (``quant_linear``'s dense
path, what runs without sparsity), ``ours int8`` / ``ours int4`` at each sparsity (the native
kernel; 0% reads every row). Sparsity is set by the threshold (a quantile of |x|). As in a
decode step, weights come from memory, not cache: each variant's calls rotate over copies of
the weight totalling at least ``--stream-bytes`` of fp32. The timed rounds interleave the
variants; each row is the median over rounds of the mean call time, and ``os.getloadavg()``
is recorded (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"smollm2 qkv/gate (576->1536)": (576, 1536), "smollm2 down (1536->576)": (1536, 576),
          "llama3.2-1b up (2048->8192)": (2048, 8192), "llama3.2-1b down (8192->2048)": (8192, 2048)}


def _time(fn, copies: int, passes: int) -> float:
    """Mean seconds per call of ``fn(i)`` over ``passes`` passes over the weight copies."""
    t = time.perf_counter()
    for _ in range(passes):
        for i in range(copies):
            fn(i)
    return (time.perf_counter() - t) / (copies * passes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.4, 0.5])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--passes", type=int, default=2, help="passes over the weight copies per timing")
    p.add_argument("--stream-bytes", type=float, default=256e6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from actsparse.kernels.cpu import quant
    from actsparse.ops.quant_linear import quant_linear_dense
    from actsparse.quant.storage import quantize_weight

    if quant.load() is None:
        raise SystemExit("the native CPU quantized kernel could not be built")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    result = {"cpu": f"{platform.machine()} ({os.cpu_count()} logical cores, shared)",
              "command": "python -m benchmarks.kernels_quant_cpu "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "batch": 1,
              "loadavg_start": os.getloadavg(), "rows": []}
    for shape, (k, n) in SHAPES.items():
        copies = max(2, -(-int(args.stream_bytes) // (4 * k * n)))
        ws = [torch.randn(n, k, generator=gen) / k ** 0.5 for _ in range(copies)]
        x = torch.randn(1, k, generator=gen)
        q8 = [quantize_weight(w, 8) for w in ws]
        q4 = [quantize_weight(w, 4, args.group_size) for w in ws]
        fns = {("dense fp32", 32, 0.0): lambda i: F.linear(x, ws[i]),
               ("dense int8 (dequantise + matmul)", 8, 0.0):
                   lambda i: quant_linear_dense(x, q8[i].qweight, q8[i].scales, None, None, 8, 0)}
        for s in args.sparsity:
            t = float(x.abs().flatten().kthvalue(max(1, int(s * k))).values) if s > 0 else -1.0
            fns[("ours int8", 8, s)] = lambda i, t=t: quant.quant_input_sparse_linear(
                x, q8[i].qweight, q8[i].scales, None, None, t, 8, 0)
            fns[("ours int4", 4, s)] = lambda i, t=t: quant.quant_input_sparse_linear(
                x, q4[i].qweight, q4[i].scales, q4[i].offsets, None, t, 4, args.group_size)
        times: dict = {key: [] for key in fns}
        for fn in fns.values():
            _time(fn, copies, 1)  # warm-up
        for r in range(args.rounds):
            keys = list(fns)
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[key].append(_time(fns[key], copies, args.passes))
        dense = statistics.median(times[("dense fp32", 32, 0.0)])
        int8 = statistics.median(times[("dense int8 (dequantise + matmul)", 8, 0.0)])
        for (variant, bits, s), ts in times.items():
            us = statistics.median(ts) * 1e6
            result["rows"].append({"shape": shape, "k": k, "n": n, "weight_copies": copies, "variant": variant,
                                   "bits": bits, "batch": 1,
                                   "sparsity": s, "us": round(us, 1), "vs_dense": dense * 1e6 / us,
                                   "vs_dense_int8": int8 * 1e6 / us})
            print(f"{shape:>32} {variant:>34} {s:4.0%} {us:9.1f} us  x{dense * 1e6 / us:.2f} vs fp32", flush=True)
    result["loadavg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
