"""End-to-end tensor-parallel decode: dense TP against sparse TP, one rank count per run.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m benchmarks.e2e_tp --batch 1 16 \\
        --out benchmarks/results/e2e_tp_h100.json

Every rank builds the same random-weight model of real Llama-3 shapes (``--model llama3-8b``,
bf16: speed depends on shapes, not values). Rank 0 calibrates a uniform TEAL plan at
``--sparsity`` on the *unsharded* model (``benchmarks.e2e.calibrate_on_tokens``: the plan of the
single-GPU e2e rows) and sends it to the others; every rank then shards the model with PyTorch's
tensor parallelism (``actsparse.distributed.shard``) and decodes with ``actsparse.greedy_decode``
(eager prefill, compiled steps, no host sync per token), compiled by Inductor (dense) and by the
sparse backend, both under CUDA graphs (``--no-cudagraphs`` to turn them off). A variant whose
CUDA-graph run fails is run again without them, and its row says so. Rows are merged into
``--out`` as they finish, next to the rows of other rank counts: run it once per
``--nproc-per-node``. ``--nproc-per-node 1`` is the single-GPU baseline through the same code.

First (``--check``, on by default) a correctness check on 2 layers of the same widths: rank 0's
logits of the sharded, compiled sparse model against the unsharded eager model masked by hooks
(``actsparse.eval.masked``), prefill then decode steps; the sharded model must be much closer to
the masked reference than the dense model is (bf16), as in ``benchmarks.e2e``.

On the CPU (gloo) the same script runs with ``--model tiny --device cpu`` (a smoke test of the code
path; the tests run it so).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from demos.tp_demo import (backends, build_model, decode_rate, device_name, finish_args, make_parser,
                           merge_rows, shared_plan)


def parse_args(argv=None):
    p = make_parser(__doc__.splitlines()[0])
    p.set_defaults(model="llama3-8b", batch=[1, 16], sparsity=0.5, prompt_len=32, new_tokens=128)
    p.add_argument("--check", action="store_true", default=True,
                   help="compare the sharded compiled model with the masked eager reference first (default)")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--budget-s", type=float, default=480, help="start no new row after this many seconds")
    p.add_argument("--timeout-s", type=float, default=420, help="a collective waits at most this long")
    args = finish_args(p, p.parse_args(argv))
    if args.sparsity <= 0:
        p.error("--sparsity must be > 0: the benchmark compares dense with sparse")
    return args


def uniform_plan(model, sparsity: float, device: str):
    """The uniform TEAL plan of the single-GPU e2e benchmark, on 512 random tokens."""
    from benchmarks.e2e import calibrate_on_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 512), generator=g).to(device)
    return calibrate_on_tokens(model, ids, sparsity)


def steps_logits(fwd, model, ids: torch.Tensor, prefill: int, steps: int) -> list[torch.Tensor]:
    """fp32 logits of a prefill over ``ids[:, :prefill]`` then one decode step per next token."""
    from transformers import StaticCache

    dev = ids.device
    cache = StaticCache(config=model.config, max_cache_len=prefill + steps + 1)
    outs = []
    with torch.no_grad():
        out = fwd(input_ids=ids[:, :prefill], past_key_values=cache, cache_position=torch.arange(prefill, device=dev))
        outs.append(out.logits[:, -1].float().clone())
        for i in range(steps):
            out = fwd(input_ids=ids[:, prefill + i:prefill + i + 1], past_key_values=cache,
                      cache_position=torch.tensor([prefill + i], device=dev))
            outs.append(out.logits[:, -1].float().clone())
    return outs


def rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, ref))


def verdict(rel: float, rel_dense: float, dtype: str) -> bool:
    """Exact up to rounding: fp32 tight; bf16 as benchmarks.e2e (well inside the masks' effect)."""
    if not math.isfinite(rel):
        return False
    if dtype in ("float32", "fp32"):
        return rel < 1e-4 and rel_dense > 100 * rel
    return rel < 0.25 * rel_dense


def check(args, mesh) -> dict:
    """The sharded, compiled sparse model against the unsharded masked eager model (rank 0)."""
    import torch.distributed as dist

    import actsparse
    from actsparse.distributed import shard
    from actsparse.eval import masked

    name = "llama3-tiny" if args.model != "tiny" else "tiny"
    torch.manual_seed(0)
    model = build_model(name, args.dtype, args.device, 2)
    plan = shared_plan(lambda: uniform_plan(model, args.sparsity, args.device))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g).to(args.device)
    ref = dense = None
    if dist.get_rank() == 0:
        with masked(model, plan):
            ref = steps_logits(model.forward, model, ids, 16, 6)
        dense = steps_logits(model.forward, model, ids, 16, 6)
    shard(model, mesh, plan)
    torch._dynamo.reset()
    be = actsparse.backend(plan, cudagraphs=args.cudagraphs)
    got = steps_logits(torch.compile(model.forward, backend=be, fullgraph=True), model, ids, 16, 6)
    res = {}
    if dist.get_rank() == 0:
        res = {"model": f"{name}, 2 layers", "ranks": dist.get_world_size(), "rel_err_vs_masked_eager": rel_err(got, ref),
               "rel_diff_masked_vs_dense": rel_err(dense, ref), "missing_rules": len(plan.rule_names() - be.found_rules)}
        res["ok"] = verdict(res["rel_err_vs_masked_eager"], res["rel_diff_masked_vs_dense"], args.dtype) \
            and res["missing_rules"] == 0
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    return res


def measure(args, mesh, t_start: float, save) -> None:
    """Dense and sparse rows for every batch; ``save(rows)`` on rank 0 after each row."""
    import torch.distributed as dist

    from actsparse.distributed import shard

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(args.model, args.dtype, args.device, args.layers)
    vocab = model.config.vocab_size
    plan = shared_plan(lambda: uniform_plan(model, args.sparsity, args.device))
    shard(model, mesh, plan)
    g = torch.Generator().manual_seed(2)
    prompts = {b: torch.randint(3, vocab, (b, args.prompt_len), generator=g).to(args.device) for b in args.batch}
    dense_rate: dict[int, float] = {}
    done: set[tuple[str, int]] = set()
    for cudagraphs in ((True, False) if args.cudagraphs else (False,)):
        for name, be in backends(plan, cudagraphs):
            torch._dynamo.reset()
            for batch, ids in prompts.items():
                if (name, batch) in done:
                    continue
                out_of_time = [time.time() - t_start > args.budget_s]
                dist.broadcast_object_list(out_of_time, src=0)  # every rank stops together
                if out_of_time[0]:
                    if rank == 0:
                        print(f"skipped {name} batch {batch}: out of time", flush=True)
                    continue
                t0 = time.time()
                try:
                    rate, _ = decode_rate(model, be, ids, args.new_tokens, args.repeats)
                except Exception as e:  # noqa: BLE001 - a CUDA-graph failure: the plain run follows
                    if not cudagraphs:
                        raise
                    if rank == 0:
                        print(f"{name} batch {batch} failed under CUDA graphs ({type(e).__name__}: "
                              f"{str(e)[:200]}); running it without", flush=True)
                    break
                done.add((name, batch))
                dense_rate.setdefault(batch, rate if name == "dense" else float("nan"))
                row = {"variant": name, "gpus": world, "batch": batch,
                       "sparsity": 0.0 if name == "dense" else plan.target, "tok_s": round(rate, 2),
                       "vs_dense": round(rate / dense_rate[batch], 3), "cudagraphs": cudagraphs,
                       "seconds": round(time.time() - t0, 1)}
                if rank == 0:
                    print(f"ranks {world}  batch {batch:3d}  {name:>11}: {rate:9.1f} tok/s  "
                          f"x{row['vs_dense']:.2f} vs dense  (CUDA graphs {cudagraphs}, {row['seconds']:.0f}s)",
                          flush=True)
                    save([row])


def main(argv=None) -> int:
    import os
    import warnings

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    t_start = time.time()
    import torch.distributed as dist

    import actsparse
    import actsparse.distributed as tp

    mesh = tp.init("nccl" if args.device == "cuda" else "gloo", timeout_s=args.timeout_s)
    out = Path(args.out) if args.out else None
    header = {("device" if args.device == "cuda" else "cpu"): device_name(args.device),
              "command": f"torchrun --nproc-per-node {dist.get_world_size()} -m benchmarks.e2e_tp "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "actsparse": actsparse.__version__, "model": args.model,
              "dtype": args.dtype, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}

    def save(rows, extra=None):
        if out is not None and dist.get_rank() == 0:
            h = dict(header, **(extra or {}))
            merge_rows(out, h, rows)

    try:
        if args.check:
            res = check(args, mesh)
            if dist.get_rank() == 0:
                print("check:", res, flush=True)
                save([], {f"check_{dist.get_world_size()}_ranks": res})
        measure(args, mesh, t_start, save)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
