"""Tensor-parallel decoding with the sparse backend: shard, compile, decode; tokens/s per rank count.

    torchrun --nproc-per-node 1 -m demos.tp_demo --model tiny      # the CPU (gloo)
    torchrun --nproc-per-node 2 -m demos.tp_demo --model tiny
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m demos.tp_demo --model llama3-8b   # GPUs (NCCL)

Every rank builds the same seeded random model (``--model tiny``: a 2-layer Llama of width 64;
``llama3-8b`` / ``llama3-1b`` / ``llama3-tiny``: random weights of real Llama-3 shapes). Rank 0
calibrates a TEAL plan at ``--sparsity`` on the *unsharded* model (``actsparse.calibrate`` on
random tokens) and sends it to the others; then every rank shards the model with PyTorch's tensor
parallelism (``actsparse.distributed.shard``: q/k/v and gate/up column-parallel, o_proj and
down_proj row-parallel, as in the model's Hugging Face tp_plan), and decodes greedily with
``actsparse.greedy_decode`` twice: compiled by Inductor (dense) and by ``backend="sparse"``.
Rank 0 prints tokens/s (the tokens of the whole batch, produced together by all ranks) and the
first tokens of both runs, and with ``--out`` adds the rows to a JSON file.

On GPUs keep ``NCCL_NVLS_ENABLE=0`` in the environment (the demo sets it where it is unset): NCCL's
NVLink SHARP (multicast) path is off on the machines this was measured on, and an NCCL that probes
it there can hang or fail at the first collective. Each rank uses the GPU of its LOCAL_RANK.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

MODELS = ("tiny", "llama3-tiny", "llama3-1b", "llama3-8b")


def make_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="tiny", choices=MODELS)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda where available")
    p.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on GPUs")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--sparsity", type=float, default=0.5, help="TEAL target of the plan (0: dense only)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (the median is kept)")
    p.add_argument("--cudagraphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs for both variants (default: on GPUs)")
    p.add_argument("--out", default=None, help="add the rows to this JSON file (rank 0)")
    return p


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on the device, and the checks."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.cudagraphs is None:
        args.cudagraphs = args.device == "cuda"
    if args.cudagraphs and args.device != "cuda":
        p.error("--cudagraphs needs --device cuda")
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if min(args.batch) < 1 or args.new_tokens < 1 or args.prompt_len < 1 or args.repeats < 1:
        p.error("--batch, --new-tokens, --prompt-len and --repeats must be >= 1")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser()
    return finish_args(p, p.parse_args(argv))


def build_model(name: str, dtype: str, device: str, layers: int | None = None):
    """The same seeded random model on every rank."""
    from actsparse.models import shaped, tiny

    if name == "tiny":
        kwargs = {} if layers is None else {"num_hidden_layers": layers}
        return tiny("llama", dtype=dtype, **kwargs).to(device)
    return shaped(name, dtype=dtype, device=device, num_layers=layers)


def shared_plan(make, src: int = 0):
    """``make()`` on rank ``src``, sent to every rank (one plan, whatever each rank's numerics)."""
    import torch.distributed as dist

    from actsparse import SparsityPlan

    box = [None]
    if dist.get_rank() == src:
        plan = make()
        box = [(plan.to_dict(), plan.tensors())]
    dist.broadcast_object_list(box, src=src)
    data, tensors = box[0]
    return SparsityPlan.from_dict(data, tensors)


def teal_plan(model, sparsity: float, vocab: int, device: str):
    """A TEAL plan at ``sparsity`` for the unsharded ``model``, calibrated on random tokens."""
    import actsparse

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (4, 64), generator=g).to(device)
    return actsparse.calibrate(model, ids, method="teal", sparsity=sparsity, progress=False)


def _sync(device: str) -> None:
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def decode_rate(model, backend, ids: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Tokens/s of ``actsparse.greedy_decode`` (eager prefill, compiled steps, no host sync per
    token), every rank in step: the time of ``new_tokens + 1`` tokens minus that of 1 token, so
    the prefill and the first token drop out. Returns the median rate and the tokens."""
    import actsparse

    device = ids.device.type
    out = None

    def timed(n: int) -> float:
        nonlocal out
        _sync(device)
        t0 = time.perf_counter()
        tokens = actsparse.greedy_decode(model, ids, n, backend=backend, ignore_eos=True)
        _sync(device)
        if n > 1:
            out = tokens
        return time.perf_counter() - t0

    timed(new_tokens + 1)  # compiles
    timed(new_tokens + 1)
    rates = sorted(new_tokens * ids.shape[0] / max(timed(new_tokens + 1) - timed(1), 1e-9) for _ in range(repeats))
    return rates[len(rates) // 2], out


def backends(plan, cudagraphs: bool):
    """(variant name, backend) for the dense baseline and the sparse plan."""
    import actsparse
    from torch._inductor.compile_fx import compile_fx

    def dense(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True} if cudagraphs else {})

    out = [("dense", dense)]
    if plan is not None:
        out.append((f"sparse-{plan.target:.0%}", actsparse.backend(plan, cudagraphs=cudagraphs)))
    return out


def merge_rows(path: Path, header: dict, rows: list[dict]) -> dict:
    """Add ``rows`` to the JSON at ``path`` (made with ``header`` if absent), replacing rows of
    the same (variant, gpus, batch); returns what was written."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({k: v for k, v in header.items() if k != "rows"})
    key = lambda r: (r.get("variant"), r.get("gpus"), r.get("batch"))  # noqa: E731
    new = {key(r) for r in rows}
    data["rows"] = [r for r in data.get("rows", []) if key(r) not in new] + list(rows)
    data["rows"].sort(key=lambda r: (r.get("batch", 0), r.get("gpus", 0), r.get("sparsity", 0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def run(args, mesh=None) -> list[dict]:
    """Every rank: build, plan, shard, decode both variants; rank 0 returns the rows."""
    import torch.distributed as dist

    import actsparse.distributed as tp

    mesh = mesh if mesh is not None else tp.init("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(args.model, args.dtype, args.device, args.layers)
    vocab = model.config.vocab_size
    plan = shared_plan(lambda: teal_plan(model, args.sparsity, vocab, args.device)) if args.sparsity > 0 else None
    tp.shard(model, mesh, plan)
    g = torch.Generator().manual_seed(2)
    prompts = {b: torch.randint(3, vocab, (b, args.prompt_len), generator=g).to(args.device) for b in args.batch}
    rows, dense_rate = [], {}
    for name, be in backends(plan, args.cudagraphs):  # one compiled step per variant, every batch
        torch._dynamo.reset()
        for batch, ids in prompts.items():
            rate, tokens = decode_rate(model, be, ids, args.new_tokens, args.repeats)
            dense_rate.setdefault(batch, rate)
            rows.append({"variant": name, "gpus": world, "batch": batch,
                         "sparsity": 0.0 if plan is None or name == "dense" else plan.target,
                         "tok_s": round(rate, 2), "vs_dense": round(rate / dense_rate[batch], 3)})
            if rank == 0:
                print(f"ranks {world}  batch {batch:3d}  {name:>11}: {rate:9.1f} tok/s  "
                      f"x{rate / dense_rate[batch]:.2f} vs dense   first tokens "
                      f"{tokens[0, args.prompt_len:args.prompt_len + 6].tolist()}", flush=True)
    dist.barrier()
    return rows if rank == 0 else []


def main(argv=None) -> int:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values notice
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    import torch.distributed as dist

    try:
        rows = run(args)
        if rows and args.out:
            import actsparse

            header = {"cpu" if args.device == "cpu" else "device": device_name(args.device),
                      "command": "torchrun --nproc-per-node N -m demos.tp_demo "
                                 + " ".join(argv if argv is not None else sys.argv[1:]),
                      "torch": torch.__version__, "actsparse": actsparse.__version__, "model": args.model,
                      "dtype": args.dtype, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
            merge_rows(Path(args.out), header, rows)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
