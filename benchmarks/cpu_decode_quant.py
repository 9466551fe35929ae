"""CPU decode speed on quantized weights: dense fp32 compiled against dense and sparse quantized variants.

    python -m benchmarks.cpu_decode_quant --model smollm2-135m --sparsity 0.4 0.5 \
        --out benchmarks/results/cpu_decode_quant_smollm2-135m.json
    python -m benchmarks.cpu_decode_quant --model smollm2-135m --families gguf torchao ...
    python -m benchmarks.cpu_decode_quant --random-shape llama3-1b --layers 8 --quantize-head ...

The greedy decode loop of ``benchmarks.cpu_decode`` (static KV cache, compiled forward,
argmax; dense eager prefill). ``dense fp32 (inductor)`` is always there (``vs_dense`` is
against it); ``--families`` adds:

* ``int8``: ``dense int8 (int8pack_mm)``, the linears as ``torch._weight_int8pack_mm`` (int8
  weights [N, K], one scale per output; PyTorch's own CPU weight-only int8 matmul), under
  Inductor; ``dense int8 (actsparse, inductor)``, ``actsparse.quantize(bits=8)`` under
  Inductor (dequantise-and-matmul: on the CPU Inductor writes the float weight out every call);
  ``dense int8 (actsparse native kernel)``: the same model through ``backend="sparse"`` with an
  empty plan (every quantized linear on the native kernel, nothing masked); ``ours int8 s``:
  ``backend="sparse"`` with the plan;
* ``gguf``: ``load(model, keep_quantized=True)`` (SmolLM2: the file's Q4_1 linears as int4
  g32, its Q8_0 tied head as grouped int8; Gemma-3: Q5_0 / Q8_0 as grouped int8, Q4_K as int4,
  Q6_K as int8 in groups of 16; ``bits`` then reads "mixed") dense under Inductor, dense on the
  native kernel, and through ``backend="sparse"``;
* ``torchao``: ``quantize_(model, Int8WeightOnlyConfig())`` (every linear, the head included)
  dense under Inductor, and through ``backend="sparse"`` (our kernel over torchao's data).

``--random-shape``: a random-weight model of real Llama-3 shapes (``actsparse.models.shaped``)
instead of a real one, plans calibrated on random tokens; ``--quantize-head`` quantizes the
output head too (int8, dense) in the int8 family, so the head's fp32 bytes do not hide the rest.
Sparse plans are calibrated on the fp32 model (``--method``, TEAL by default) and apply
unchanged to every quantized variant.

``--skip`` leaves variants out (a run on a loaded 2-core machine compiles about three within
ten minutes; each run has its own dense fp32 row, so ratios are always within one run).
Every variant is compiled first, then the timed rounds interleave them (each round decodes
once with every variant, in a rotated order), so load from other processes on a shared
machine spreads over all variants; each row reports the median over rounds and every run, and
``vs_dense_paired`` / ``vs_best_dense_int8_paired``: the median over rounds of the ratio to the
baseline's rate in the same round, which cancels load that changes between rounds.
A recompilation during the timed rounds is an error. ``os.getloadavg()`` is recorded before,
after each round and after. The sparse rows are checked against the same quantized model in
eager mode masked by hooks (teacher-forced logits and greedy agreement).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
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


def _sharing(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares every tensor with it (one more compiled
    variant of the same weights, no more memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _quantize_head(model: nn.Module, make) -> None:
    """Replace the output head by ``make(head)`` (untying it from the embedding)."""
    model.lm_head = make(model.get_output_embeddings())
    model.config.tie_word_embeddings = False


def _torchao_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())  # a tied head gets its own int8 weight; the embedding stays
    model.config.tie_word_embeddings = False
    return model


def build_variants(args, base: nn.Module, plans: dict, load_gguf) -> list[dict[str, Any]]:
    """The variants of ``--families``, dense fp32 first (see the module docstring)."""
    import actsparse
    from actsparse.quant import QuantLinear

    variants: list[dict[str, Any]] = [
        {"variant": "dense fp32 (inductor)", "bits": 32, "sparsity": 0.0, "model": base, "backend": "inductor"}]

    def sparse(label: str, bits: int | str, model: nn.Module) -> None:
        # an empty plan: every quantized linear on the native kernel, nothing masked
        empty = actsparse.SparsityPlan.from_thresholds(base, {})
        variants.append({"variant": f"dense {label} (actsparse native kernel)", "bits": bits, "sparsity": 0.0,
                         "model": _sharing(model), "backend": actsparse.backend(empty)})
        for s, plan in plans.items():
            variants.append({"variant": f"ours {label} {s:.0%}", "bits": bits, "sparsity": s,
                             "model": _sharing(model), "backend": actsparse.backend(plan), "plan": plan})

    if "int8" in args.families:
        if not args.no_int8pack:
            packed = int8pack(_sharing_embedding(base))
            if args.quantize_head:
                _quantize_head(packed, Int8PackLinear)
            variants.append({"variant": "dense int8 (int8pack_mm, inductor)", "bits": 8, "sparsity": 0.0,
                             "model": packed, "backend": "inductor"})
        q8 = actsparse.quantize(_sharing_embedding(base), bits=8)
        if args.quantize_head:
            _quantize_head(q8, lambda h: QuantLinear.from_linear(h, 8))
        variants.append({"variant": "dense int8 (actsparse, inductor)", "bits": 8, "sparsity": 0.0, "model": q8,
                         "backend": "inductor"})
        sparse("int8", 8, q8)
    if "gguf" in args.families:
        kq = load_gguf()
        widths = {m.bits for m in kq.modules() if isinstance(m, QuantLinear)}
        bits = widths.pop() if len(widths) == 1 else "mixed"
        variants.append({"variant": "dense gguf keep_quantized (inductor)", "bits": bits, "sparsity": 0.0,
                         "model": kq, "backend": "inductor"})
        sparse("gguf keep_quantized", bits, kq)
    if "torchao" in args.families:
        ao = _torchao_int8(_sharing_embedding(base))
        variants.append({"variant": "dense torchao int8 (inductor)", "bits": 8, "sparsity": 0.0, "model": ao,
                         "backend": "inductor"})
        sparse("torchao int8", 8, ao)
    return variants


def _sharing_embedding(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its input embedding (the largest tensor) with it."""
    emb = model.get_input_embeddings().weight
    return copy.deepcopy(model, {id(emb): emb})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-shape", default=None, metavar="SHAPE",
                   help="instead of --model: a random model of these Llama-3 shapes (e.g. llama3-1b)")
    p.add_argument("--layers", type=int, default=None, help="--random-shape: decoder layers")
    p.add_argument("--families", nargs="+", default=["int8"], choices=["int8", "gguf", "torchao"])
    p.add_argument("--quantize-head", action="store_true", help="int8 family: the output head int8 too")
    p.add_argument("--no-int8pack", action="store_true", help="int8 family: leave out the int8pack_mm row")
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.4, 0.5])
    p.add_argument("--skip", nargs="*", default=[], metavar="VARIANT",
                   help="leave out these variants (exact names), to keep one run short; dense fp32 always runs")
    p.add_argument("--method", default="teal", help="calibration method of the sparse plans (on fp32)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, each decoding once per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--no-check", action="store_true", help="skip the masked-eager checks of the sparse rows")
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import actsparse
    from transformers import StaticCache

    from actsparse.models import load, shaped

    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.cpu_decode_quant " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.random_shape:
        base = shaped(args.random_shape, dtype=torch.float32, device="cpu", num_layers=args.layers).eval()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, base.config.vocab_size, (1, 32), generator=gen)
        calib = torch.randint(0, base.config.vocab_size, (args.calib_tokens,), generator=gen)
        name = f"random {args.random_shape}-shaped ({base.config.num_hidden_layers} layers)"
        plans = {s: actsparse.calibrate(base, calib, method=args.method, sparsity=s, token_budget=args.calib_tokens,
                                        seq_len=256, progress=False) for s in args.sparsity}
    else:
        from actsparse.calibration.data import wikitext2_split

        base, tok = load(args.model, dtype=torch.float32)
        calib, evaluation, _ = wikitext2_split(args.data)
        ids = tok(evaluation[:2000], return_tensors="pt").input_ids[:, :64]
        name = args.model
        plans = {s: actsparse.calibrate(base, calib, method=args.method, sparsity=s, tokenizer=tok,
                                        token_budget=args.calib_tokens) for s in args.sparsity}
    cache_len = ids.shape[1] + args.new_tokens + 8
    result: dict[str, Any] = {
        "cpu": f"{platform.machine()} ({os.cpu_count()} logical cores, shared)", "command": command,
        "model": name, "activations": "float32", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens,
        "rounds": args.rounds, "method": args.method, "plan_calibrated_on": "fp32 model",
        "families": args.families, "quantized_head": bool(args.quantize_head),
        "loadavg_start": os.getloadavg(), "loadavg_rounds": [], "rows": []}
    if "torchao" in args.families:
        import torchao

        result["torchao"] = torchao.__version__
    out = Path(args.out) if args.out else None

    variants = build_variants(args, base, plans, lambda: load(args.model, dtype=torch.float32,
                                                               keep_quantized=True)[0])
    unknown = sorted(set(args.skip) - {v["variant"] for v in variants})
    if unknown:
        raise SystemExit(f"--skip: no variant named {unknown}; variants: {[v['variant'] for v in variants]}")
    variants = [v for i, v in enumerate(variants) if i == 0 or v["variant"] not in args.skip]
    import torch._inductor.config as inductor_config

    # torchao's quantize_ sets its recommended Inductor options process-wide: every variant of
    # the run is compiled with them, the fp32 baseline included
    result["inductor"] = {k: getattr(inductor_config, k) for k in ("coordinate_descent_tuning",
                                                                   "coordinate_descent_check_all_directions")}
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
        result["loadavg_rounds"].append([round(x, 2) for x in os.getloadavg()])
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
    quant_dense = [r for r in result["rows"] if r["variant"].startswith("dense") and r["bits"] != 32]
    paired(result["rows"], variants[0]["variant"])
    if quant_dense:
        best = max(quant_dense, key=lambda r: r["tok_s"])
        for r in result["rows"]:
            r["vs_best_dense_int8"] = r["tok_s"] / best["tok_s"]
        result["best_dense_quantized"] = best["variant"]
        paired(result["rows"], best["variant"])
    save()  # the timings, before the (slower) checks
    for v, row in zip(variants, result["rows"]):
        if "plan" not in v or args.no_check:
            continue
        plan = v["plan"]
        ref = reference_tokens(v["model"], plan, ids, args.new_tokens, cache_len)
        row["plan"] = {"method": plan.method, "target": plan.target, "overall_sparsity": plan.overall_sparsity}
        row["greedy_prefix_agreement_with_masked_eager"] = agreement(v["tokens"], ref)
        row["check_vs_masked_eager"] = check_against_reference(v["model"], v["step"], plan, ids,
                                                               args.new_tokens, cache_len, v["cache"])
        save()
    for r in result["rows"]:
        print(f"{r['variant']:>40}: {r['tok_s']:7.2f} tok/s  x{r['vs_dense']:.2f} vs fp32"
              + (f", x{r['vs_best_dense_int8']:.2f} vs best dense quantized" if "vs_best_dense_int8" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
