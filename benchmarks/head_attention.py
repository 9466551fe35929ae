"""Head-sparse decode attention against the dense attention the baseline runs, per batch and context.

    python -m benchmarks.head_attention --out $OUT/head_attention_h200.json

Llama-3-8B attention (32 query heads, 8 KV heads of 128, bf16), one decode token per sequence,
a static cache exactly as long as the context (bool mask, all attended). Variants, each timed as
a CUDA graph of back-to-back calls over cache copies that miss L2 (``benchmarks.harness``):

* ``dense_repeat_kv``: what a compiled Hugging Face decode step runs: K/V repeated to the query
  heads (``repeat_kv``: a materialised copy), then scaled_dot_product_attention with the mask;
* ``dense_gqa``: scaled_dot_product_attention with ``enable_gqa=True`` on the cache as it is;
* ``ours`` at KV-group density 1.0, 0.5 and 0.25 (random selections per sequence).

Each variant is checked against the fp32 reference first. ``kv_TBps`` is the selected units'
K/V bytes over the time; ``kv_bw_frac`` that over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from actsparse.kernels.triton import head_attention as ha
from actsparse.ops.reference import head_sparse_attention_reference
from benchmarks.harness import ERR_OK, bench_calls, command_line, copy_bandwidth, log, rel_err, result, write_json

HQ, HKV, D = 32, 8, 128
DENSITIES = (1.0, 0.5, 0.25)


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_attention", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--max-seconds", type=float, default=240)
    a = p.parse_args(argv)
    t0 = time.time()
    bw = copy_bandwidth()
    res = result(command_line("benchmarks.head_attention", argv), [], copy_bandwidth_TBps=bw / 1e12,
                 shape={"heads": HQ, "kv_heads": HKV, "head_dim": D, "dtype": "bfloat16"})
    log(f"{res['gpu']}: copy {bw / 1e12:.2f} TB/s")
    g = torch.Generator(device="cuda").manual_seed(0)
    for s_len in a.contexts:
        for b in a.batches:
            if time.time() - t0 > a.max_seconds:
                res.setdefault("skipped", []).append(f"batch {b} context {s_len}")
                continue
            kv = 2 * b * HKV * s_len * D * 2
            copies = max(1, min(8, int(-(-240e6 // kv))))
            ks = [torch.randn(b, HKV, s_len, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
            vs = [torch.randn(b, HKV, s_len, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
            qs = [torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
            mask = torch.ones(b, 1, 1, s_len, dtype=torch.bool, device="cuda")
            calls = max(8, copies)
            scale = D ** -0.5
            dense = bench_calls([lambda i=i: F.scaled_dot_product_attention(
                qs[i % 4], repeat_kv(ks[i % copies], HQ // HKV), repeat_kv(vs[i % copies], HQ // HKV),
                attn_mask=mask, scale=scale) for i in range(calls)])
            try:
                gqa = bench_calls([lambda i=i: F.scaled_dot_product_attention(
                    qs[i % 4], ks[i % copies], vs[i % copies], attn_mask=mask, scale=scale, enable_gqa=True)
                    for i in range(calls)])
            except Exception as e:  # noqa: BLE001 - not every torch build takes GQA with a mask
                gqa = None
                log(f"  enable_gqa failed: {type(e).__name__}: {e}")
            base = dict(batch=b, context=s_len, sparsity=0.0, tok_s=None, dense_repeat_kv_us=dense, dense_gqa_us=gqa,
                        kv_bytes=kv, copies=copies)
            res["rows"].append(dict(base, variant="dense_repeat_kv", head_density=1.0, us=dense, vs_dense=1.0,
                                    kv_TBps=kv / dense / 1e6, kv_bw_frac=kv / dense / 1e6 / (bw / 1e12)))
            if gqa is not None:
                res["rows"].append(dict(base, variant="dense_gqa", head_density=1.0, us=gqa, vs_dense=dense / gqa,
                                        kv_TBps=kv / gqa / 1e6, kv_bw_frac=kv / gqa / 1e6 / (bw / 1e12)))
            for dens in DENSITIES:
                n_sel = max(1, round(dens * HKV))
                idx = torch.stack([torch.randperm(HKV, device="cuda", generator=g)[:n_sel] for _ in range(b)]).int()
                ref = head_sparse_attention_reference(qs[0], ks[0], vs[0], mask, idx, HQ // HKV, scale)
                got = ha.launch_head_sparse_decode(qs[0], ks[0], vs[0], mask, idx, HQ // HKV, scale)
                err = rel_err(got, ref)
                us = bench_calls([lambda i=i: ha.launch_head_sparse_decode(
                    qs[i % 4], ks[i % copies], vs[i % copies], mask, idx, HQ // HKV, scale) for i in range(calls)])
                read = kv * n_sel / HKV
                res["rows"].append(dict(base, variant="ours", head_density=n_sel / HKV, us=us, vs_dense=dense / us,
                                        vs_gqa=None if gqa is None else gqa / us, err=err, ok=err < ERR_OK,
                                        kv_TBps=read / us / 1e6, kv_bw_frac=read / us / 1e6 / (bw / 1e12),
                                        ideal_x=None))
                log(f"b={b:3d} ctx={s_len:6d} d={n_sel / HKV:.2f}: ours {us:8.1f}us vs repeat_kv {dense:8.1f}us "
                    f"(x{dense / us:.2f}), gqa {gqa if gqa is None else round(gqa, 1)}us; "
                    f"KV {read / us / 1e6:.2f} TB/s = {read / us / 1e6 / (bw / 1e12):.2f} of copy; err {err:.1e}")
            write_json(a.out, res)
            del ks, vs, qs
            torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t0
    write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
