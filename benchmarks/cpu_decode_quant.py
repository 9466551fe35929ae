"""CPU decode speed on int8 weights: dense fp32 compiled, dense int8, and ours int8 + sparsity.

    python -m benchmarks.cpu_decode_quant --model smollm2-135m --sparsity 0.4 0.5 \
        --out benchmarks/results/cpu_decode_quant_smollm2-135m.json

The greedy decode loop of ``benchmarks.cpu_decode`` (static KV cache, compiled forward,
argmax; dense eager prefill). Variants:

* ``dense fp32 (inductor)``: the float model under Inductor (``vs_dense`` is against it);
* ``dense int8 (int8pack_mm)``: the model's linears as ``torch._weight_int8pack_mm`` (int8
  weights [N, K], one scale per output; PyTorch's own CPU weight-only int8 matmul, the one
  torchao's CPU int8 weight-only path lowers to), under Inductor;
* ``dense int8 (actsparse)``: ``actsparse.quantize(bits=8)`` under Inductor (dequantise-and-matmul);
* ``ours int8 s``: the same int8 model through ``backend="sparse"`` with a TEAL plan
  calibrated on the fp32 model: the native CPU int8 kernel at every masked linear.

Every variant is compiled first, then the timed rounds interleave them (each round decodes
once with every variant, in a rotated order), so load from other processes on a shared
machine spreads over all variants; each row reports the median over rounds and every run, and
``vs_dense_paired`` / ``vs_best_dense_int8_paired``: the median over rounds of the ratio to the
baseline's rate in the same round, which cancels load that changes between rounds.
A recompilation during the timed rounds is an error. ``os.getloadavg()`` is recorded before
and after. The sparse rows are checked against the eager int8 model masked by hooks (teacher
forced logits and greedy agreement).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.cpu_decode import agreement, check_against_reference, compile_count, decode_loop, reference_tokens


class Int8PackLinear(nn.Module):
    """A linear over ``torch._weight_int8pack_mm``: int8 weight [N, K], one scale per output."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach().float()
        scale = torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / 127, torch.ones(w.shape[0]))
        self.register_buffer("w", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(lin.weight.dtype))
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.w, self.scale)
        y = y.reshape(*x.shape[:-1], self.w.shape[0])
        return y if self.bias is None else y + self.bias


def int8pack(model: nn.Module) -> nn.Module:
    """The model with every linear but the output head replaced by ``Int8PackLinear`` (in place)."""
    from actsparse.quant import quantizable_linears

    for name, lin in quantizable_linears(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Int8PackLinear(lin))
    return model


def paired(rows: list[dict], base: str) -> None:
    """Add ``vs_<base>_paired`` to each row: the median over rounds of its rate over ``base``'s rate
    in the same round (``runs`` are per round), which cancels load that changes between rounds."""
    ref = next(r for r in rows if r["variant"] == base)["runs"]
    key = "vs_dense_paired" if base.startswith("dense fp32") else "vs_best_dense_int8_paired"
    for r in rows:
        r[key] = statistics.median(a / b for a, b in zip(r["runs"], ref))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    p.add_argument("--method", default="teal", help="calibration method of the sparse plans (on fp32)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, each decoding once per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import actsparse
    from transformers import StaticCache

    from actsparse.calibration.data import wikitext2_split
    from actsparse.models import load

    torch.set_num_threads(args.threads)
    base, tok = load(args.model, dtype=torch.float32)
    calib, evaluation, split = wikitext2_split(args.data)
    ids = tok(evaluation[:2000], return_tensors="pt").input_ids[:, :64]
    cache_len = ids.shape[1] + args.new_tokens + 8
    command = "python -m benchmarks.cpu_decode_quant " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "cpu": f"{platform.machine()} ({os.cpu_count()} logical cores, shared)", "command": command,
        "model": args.model, "activations": "float32", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens,
        "rounds": args.rounds, "method": args.method, "plan_calibrated_on": "fp32 model",
        "loadavg_start": os.getloadavg(), "rows": []}
    out = Path(args.out) if args.out else None

    plans = {s: actsparse.calibrate(base, calib, method=args.method, sparsity=s, tokenizer=tok,
                                    token_budget=args.calib_tokens) for s in args.sparsity}
    q8 = actsparse.quantize(copy.deepcopy(base), bits=8)
    variants: list[dict[str, Any]] = [
        {"variant": "dense fp32 (inductor)", "bits": 32, "sparsity": 0.0, "model": base, "backend": "inductor"},
        {"variant": "dense int8 (int8pack_mm, inductor)", "bits": 8, "sparsity": 0.0,
         "model": int8pack(copy.deepcopy(base)), "backend": "inductor"},
        {"variant": "dense int8 (actsparse, inductor)", "bits": 8, "sparsity": 0.0, "model": q8,
         "backend": "inductor"}]
    for s, plan in plans.items():
        variants.append({"variant": f"ours int8 {s:.0%}", "bits": 8, "sparsity": s, "model": copy.deepcopy(q8),
                         "backend": actsparse.backend(plan), "plan": plan})
    for v in variants:  # compile and warm up every variant before any timing
        t0 = time.perf_counter()
        v["cache"] = StaticCache(config=v["model"].config, max_cache_len=cache_len)
        v["step"] = torch.compile(v["model"].forward, backend=v["backend"], fullgraph=True)
        decode_loop(v["model"], v["step"], ids, 4, v["cache"])
        decode_loop(v["model"], v["step"], ids, args.new_tokens, v["cache"])
        v["compile_and_warmup_s"] = time.perf_counter() - t0
        v["runs"] = []
        print(f"[cpu_decode_quant] compiled {v['variant']} ({v['compile_and_warmup_s']:.0f} s)", file=sys.stderr,
              flush=True)
    before = compile_count()
    for r in range(args.rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            v["tokens"], s = decode_loop(v["model"], v["step"], ids, args.new_tokens, v["cache"])
            v["runs"].append(args.new_tokens / s)
        print(f"[cpu_decode_quant] round {r + 1}: " + ", ".join(f"{v['variant']} {v['runs'][-1]:.1f}"
                                                                for v in variants), file=sys.stderr, flush=True)
    if compile_count() != before:
        raise RuntimeError("recompilation during the timed rounds: the figures would measure compilation")
    result["loadavg_end"] = os.getloadavg()
    dense = statistics.median(variants[0]["runs"])

    def save():
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))

    for v in variants:
        result["rows"].append({
            "variant": v["variant"], "bits": v["bits"], "batch": 1, "sparsity": v["sparsity"],
            "tok_s": statistics.median(v["runs"]), "runs": [round(x, 3) for x in v["runs"]],
            "vs_dense": statistics.median(v["runs"]) / dense,
            "compile_and_warmup_s": round(v["compile_and_warmup_s"], 1), "tokens": v["tokens"]})
    best = max((r for r in result["rows"] if r["variant"].startswith("dense int8")), key=lambda r: r["tok_s"])
    for r in result["rows"]:
        r["vs_best_dense_int8"] = r["tok_s"] / best["tok_s"]
    result["best_dense_int8"] = best["variant"]
    paired(result["rows"], variants[0]["variant"])
    paired(result["rows"], best["variant"])
    save()  # the timings, before the (slower) checks
    for v, row in zip(variants, result["rows"]):
        if "plan" not in v:
            continue
        plan = v["plan"]
        ref = reference_tokens(v["model"], plan, ids, args.new_tokens, cache_len)
        row["plan"] = {"method": plan.method, "target": plan.target, "overall_sparsity": plan.overall_sparsity}
        row["greedy_prefix_agreement_with_masked_eager"] = agreement(v["tokens"], ref)
        row["check_vs_masked_eager"] = check_against_reference(v["model"], v["step"], plan, ids,
                                                               args.new_tokens, cache_len, v["cache"])
        save()
    for r in result["rows"]:
        print(f"{r['variant']:>36}: {r['tok_s']:7.2f} tok/s  x{r['vs_dense']:.2f} vs fp32, "
              f"x{r['vs_best_dense_int8']:.2f} vs best dense int8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
