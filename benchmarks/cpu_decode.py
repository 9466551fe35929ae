"""CPU decode speed: dense ``torch.compile`` against the sparse backend, in the same run.

A minimal greedy decode loop (a static KV cache, the compiled forward, argmax, nothing else
per token), timed after warm-up; every variant decodes the same prompt. HF ``generate``
is not used here: on the CPU it does not compile the decode step itself, and wrapping its
``forward`` recompiles on every call (its cache-position handling changes guards), which
measured compilation instead of decoding.

Each variant is checked before it is timed: the number of Dynamo compilations during the
timed tokens must be zero (a recompiling variant is an error, not a slow row), and its
greedy tokens are compared with the eager model under the same masks (the hook reference).

    python -m benchmarks.cpu_decode --model smollm2-135m --sparsity 0.5 --out benchmarks/results/cpu_decode_smollm2-135m.json

A relufied model (``--adapters``, an adapter file of ``benchmarks.relufy``, rebuilt from the
base model) is timed against dense ``torch.compile`` of itself and of the original model. On a
shared machine the variants' repeats are interleaved (every variant compiled first, each on its
own copy of the model; then round after round, one decode of each), the medians compared, and
the load average recorded with every round:

    python -m benchmarks.cpu_decode --sparsity 0.5 --threads 1 --repeats 7 \\
        --adapters relufy_smollm2-135m.adapters.safetensors \\
        --out benchmarks/results/cpu_decode_relufied_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def compile_count() -> int:
    """Dynamo frames compiled so far in this process (grows on every recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def decode_loop(model, step: Callable, ids: torch.Tensor, new_tokens: int, cache,
                before_decode: Callable[[], None] | None = None, forced: list[int] | None = None,
                logits: list | None = None) -> tuple[list[int], float]:
    """Prefill with the dense eager model, then ``new_tokens`` greedy steps through ``step``;
    (tokens, seconds of the decode steps). ``before_decode`` runs between the two; with
    ``forced`` the inputs are those tokens instead of the argmax; ``logits`` collects each
    step's logits."""
    n = ids.shape[1]
    cache.reset()
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        if before_decode is not None:
            before_decode()
        toks = [int(tok)]
        t0 = time.perf_counter()
        for i in range(new_tokens):
            out_logits = step(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([n + i]),
                              use_cache=True).logits[:, -1:]
            if logits is not None:
                logits.append(out_logits.flatten().clone())
            tok = out_logits.argmax(-1) if forced is None else torch.tensor([[forced[i + 1]]])
            toks.append(int(out_logits.argmax(-1)))
        seconds = time.perf_counter() - t0
    return toks, seconds


def time_variant(model, backend, ids: torch.Tensor, new_tokens: int, repeats: int,
                 max_cache_len: int) -> dict[str, Any]:
    """Compile ``model.forward`` with ``backend`` and time its decode; median over repeats."""
    from transformers import StaticCache

    torch._dynamo.reset()
    # one cache object for every call: a step compiled against one StaticCache and called
    # with another was seen to read the first one's tensors (torch 2.13, transformers 5)
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    step = model.forward if backend is None else torch.compile(model.forward, backend=backend, fullgraph=True)
    t = time.perf_counter()
    decode_loop(model, step, ids, 4, cache)  # compiles
    compile_s = time.perf_counter() - t
    decode_loop(model, step, ids, new_tokens, cache)  # warm-up at full length
    before = compile_count()
    rates, toks = [], None
    for _ in range(repeats):
        toks, s = decode_loop(model, step, ids, new_tokens, cache)
        rates.append(new_tokens / s)
    recompiles = compile_count() - before
    if recompiles:
        raise RuntimeError(f"{recompiles} recompilation(s) during timed decoding: the figure would "
                           "measure compilation, not decoding")
    return {"tokens_per_s": statistics.median(rates), "runs": rates, "compile_and_first_s": compile_s,
            "tokens": toks, "_step": step, "_cache": cache}


def compile_variant(model, backend, ids: torch.Tensor, new_tokens: int, max_cache_len: int) -> dict[str, Any]:
    """Compile ``model.forward`` with ``backend`` (no Dynamo reset: several variants live in one
    process, each guarded on its own model) and decode once at full length (warm-up)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    step = model.forward if backend is None else torch.compile(model.forward, backend=backend, fullgraph=True)
    t = time.perf_counter()
    decode_loop(model, step, ids, 4, cache)
    compile_s = time.perf_counter() - t
    decode_loop(model, step, ids, new_tokens, cache)
    return {"model": model, "step": step, "cache": cache, "compile_and_first_s": compile_s}


def time_interleaved(variants: dict[str, dict[str, Any]], ids: torch.Tensor, new_tokens: int,
                     repeats: int) -> tuple[dict[str, dict[str, Any]], list[list[float]]]:
    """Round after round, one timed decode of each variant (noise on a shared machine hits them
    alike); per variant the median rate, all rates and the tokens; and the load average
    (1, 5, 15 min) after each round. A recompilation during the rounds is an error."""
    import os

    before = compile_count()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    toks: dict[str, list[int]] = {}
    load = []
    for _ in range(repeats):
        for name, v in variants.items():
            toks[name], s = decode_loop(v["model"], v["step"], ids, new_tokens, v["cache"])
            rates[name].append(new_tokens / s)
        load.append([round(x, 2) for x in os.getloadavg()])
    recompiles = compile_count() - before
    if recompiles:
        raise RuntimeError(f"{recompiles} recompilation(s) during timed decoding: the figure would "
                           "measure compilation, not decoding")
    return ({k: {"tokens_per_s": statistics.median(r), "runs": r, "tokens": toks[k]} for k, r in rates.items()},
            load)


def check_against_reference(model, step, plan, ids: torch.Tensor, new_tokens: int,
                            max_cache_len: int, cache=None) -> dict[str, float]:
    """The compiled step against the eager model masked by hooks, on the same tokens.

    The compiled step decodes greedily; the reference is fed the same tokens (teacher
    forcing), so every step compares logits of identical inputs. Greedy sequences of two
    masked models may still part: masks are discontinuous, and the last-bit differences of
    fused arithmetic flip the channels sitting on a threshold. ``cache``: the static cache the
    step was compiled with (a compiled step must keep its cache object; see ``time_variant``).
    """
    from transformers import StaticCache

    got: list = []
    cache = cache if cache is not None else StaticCache(config=model.config, max_cache_len=max_cache_len)
    toks, _ = decode_loop(model, step, ids, new_tokens, cache, logits=got)
    ref: list = []
    reference_tokens(model, plan, ids, new_tokens, max_cache_len, forced=toks, logits=ref)
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(got, ref)]
    same = [int(a.argmax()) == int(b.argmax()) for a, b in zip(got, ref)]
    return {"max_rel_logit_diff": max(rel), "median_rel_logit_diff": statistics.median(rel),
            "argmax_agreement": sum(same) / len(same)}


def reference_tokens(model, plan, ids: torch.Tensor, new_tokens: int, max_cache_len: int,
                     forced: list[int] | None = None, logits: list | None = None) -> list[int]:
    """Greedy tokens of the eager model with the plan's input masks applied by hooks while
    decoding (the prefill is dense, as in ``time_variant``)."""
    from transformers import StaticCache

    from actsparse.ops.reference import input_mask

    hooks: list = []

    def install():
        hooks.extend(model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, t=t: (torch.where(input_mask(a[0], t, False), a[0], torch.zeros((), dtype=a[0].dtype)),))
            for n, t in plan.thresholds.items())
    try:
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        return decode_loop(model, model.forward, ids, new_tokens, cache, before_decode=install,
                           forced=forced, logits=logits)[0]
    finally:
        for h in hooks:
            h.remove()


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of greedy tokens equal up to the first divergence (1.0: identical).

    Masks are discontinuous: Inductor's fused fp32 arithmetic differs from eager in the last
    bits, which flips channels sitting on a threshold, so long greedy sequences may part."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / max(1, min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.5])
    p.add_argument("--method", default="teal", help="calibration method of the sparse plans")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="compare these methods' plans at each --sparsity: every variant on its own copy of "
                        "the model, timed in interleaved rounds (a shared machine's noise hits them alike)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--data", default=None)
    p.add_argument("--eager", action="store_true", help="also time the uncompiled model")
    p.add_argument("--adapters", default=None,
                   help="a relufied model's adapter file: time it (exact plan, sparse backend) against dense "
                        "compiled of itself and of the original model, repeats interleaved")
    p.add_argument("--random-relu", default=None, metavar="SHAPE",
                   help="instead: a random model of these Llama-3 shapes (actsparse.models.shaped, e.g. llama3-1b) "
                        "with ReLU MLPs, dense compiled against its exact plan")
    p.add_argument("--layers", type=int, default=None, help="--random-relu: number of decoder layers")
    p.add_argument("--mlp-sparsity", type=float, default=None,
                   help="--random-relu: shifted ReLU calibrated to this MLP sparsity on random tokens (a stand-in "
                        "for a fine-tuned relufied model), timed beside the original SiLU model compiled dense")
    p.add_argument("--input-sparsity", type=float, nargs="*", default=[],
                   help="with --mlp-sparsity or --adapters: also the exact plan plus TEAL (--method) thresholds "
                        "at this sparsity on the linears it leaves dense (attention, gate/up), calibrated on the "
                        "relufied model")
    p.add_argument("--ablate", nargs="*", default=[], choices=["gqa", "fuse"],
                   help="with --methods: each sparse variant again without that rewrite (gqa_attention, "
                        "fuse_gated_product), timed in the same rounds")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.ablate and not args.methods:
        p.error("--ablate takes --methods (the interleaved comparison)")
    if args.mlp_sparsity is not None and (not args.random_relu or not 0 < args.mlp_sparsity < 1):
        p.error("--mlp-sparsity takes --random-relu and a value in (0, 1)")
    if args.input_sparsity and ((args.mlp_sparsity is None and not args.adapters)
                                or not all(0 < s < 1 for s in args.input_sparsity)):
        p.error("--input-sparsity takes --mlp-sparsity or --adapters, and values in (0, 1)")

    if args.random_relu:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = {"command": "python -m benchmarks.cpu_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "dtype": "float32", "device": f"CPU {platform.machine()}", "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": []}
        random_relu_run(args, result)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
        for r in result["rows"]:
            print(f"{r['variant']:>30}: {r['tok_s']:7.2f} tok/s  x{r['vs_dense']:.2f}")
        return 0

    import actsparse
    from actsparse.calibration.data import wikitext2_split
    from actsparse.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype=torch.float32)
    model.eval()
    calib, evaluation, split = wikitext2_split(args.data)
    prompt = evaluation[:2000]
    ids = tok(prompt, return_tensors="pt").input_ids[:, :64]
    cache_len = ids.shape[1] + args.new_tokens + 8
    result: dict[str, Any] = {
        "command": "python -m benchmarks.cpu_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "dtype": "float32", "device": f"CPU {platform.machine()}",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "repeats": args.repeats,
        "calibration_text": split.get("calibration"), "prompt_text": split.get("evaluation"),
        "rows": [],
    }
    out = Path(args.out) if args.out else None

    def save():
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))

    if args.methods:
        methods_run(model, calib, tok, ids, cache_len, args, result)
        save()
        for r in result["rows"]:
            print(f"{r['variant']:>24}: {r['tok_s']:7.2f} tok/s  x{r['vs_dense']:.2f}")
        return 0
    if args.adapters:
        relufied_run(model, calib, tok, ids, cache_len, args, result)
        save()
        for r in result["rows"]:
            extra = f"  (x{r['vs_relufied_dense']:.2f} vs relufied dense)" if r.get("vs_relufied_dense") else ""
            print(f"{r['variant']:>40}: {r['tok_s']:7.2f} tok/s  x{r['vs_dense']:.2f}{extra}")
        return 0

    variants: list[tuple[str, Any, Any]] = []
    if args.eager:
        variants.append(("eager dense", None, None))
    variants.append(("dense (inductor)", "inductor", None))
    for s in args.sparsity:
        plan = actsparse.calibrate(model, calib, method=args.method, sparsity=s, tokenizer=tok,
                                   token_budget=args.calib_tokens)
        variants.append((f"{args.method} {s:.0%}", "sparse", plan))
    dense_rate = None
    for name, be, plan in variants:
        print(f"[cpu_decode] {name} ...", file=sys.stderr, flush=True)
        backend = actsparse.backend(plan) if plan is not None else be
        if plan is not None:
            actsparse.prepare(model, plan)
        row = {"variant": name, **time_variant(model, backend, ids, args.new_tokens, args.repeats, cache_len)}
        step, step_cache = row.pop("_step"), row.pop("_cache")
        if plan is not None:
            ref = reference_tokens(model, plan, ids, args.new_tokens, cache_len)
            row["plan"] = {"method": plan.method, "target": plan.target,
                           "overall_sparsity": plan.overall_sparsity}
            row["greedy_prefix_agreement_with_masked_eager"] = agreement(row["tokens"], ref)
            row["check_vs_masked_eager"] = check_against_reference(model, step, plan, ids, args.new_tokens,
                                                                   cache_len, step_cache)
        if name == "dense (inductor)":
            dense_rate = row["tokens_per_s"]
        if dense_rate:
            row["speedup_vs_dense_inductor"] = row["tokens_per_s"] / dense_rate
        result["rows"].append(row)
        save()
        print(f"[cpu_decode] {name}: {row['tokens_per_s']:.2f} tok/s", file=sys.stderr, flush=True)
    for r in result["rows"]:
        print(f"{r['variant']:>20}: {r['tokens_per_s']:7.2f} tok/s  x{r.get('speedup_vs_dense_inductor', float('nan')):.2f}")
    return 0


LOAD_NOTE = ("2-core machine shared with other jobs: variants interleaved round by round, medians compared; "
             "the load average (1, 5, 15 min) after each round is in loadavg_rounds")


def weight_bytes_bound(model, mlp_sparsity: float, input_sparsity: float = 0.0) -> dict[str, float]:
    """What skipping the up rows and down columns of zero neurons can save at best: the
    fraction of a decode step's weight bytes still read (gate in full, every other weight in
    full, the LM head included), and its inverse, the bandwidth-bound speedup.
    ``input_sparsity``: input thresholds on every other linear of the layers too (attention and
    gate/up; the masks taken as independent of the neurons' zeros)."""
    from actsparse.train import gated_mlps

    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once: the head
    mlps = gated_mlps(model)
    up = sum(m.module.up_proj.weight.numel() for m in mlps)
    down = sum(m.module.down_proj.weight.numel() for m in mlps)
    gate = sum(m.module.gate_proj.weight.numel() for m in mlps)
    attn = sum(mod.weight.numel() for name, mod in model.named_modules()
               if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(mod, "weight"))
    kept_up = (1 - mlp_sparsity) * (1 - input_sparsity)
    saved = (up * (1 - kept_up) + down * mlp_sparsity + (gate + attn) * input_sparsity)
    frac = (total - saved) / total
    return {"weight_bytes_fraction": round(frac, 4), "speedup_bound_from_bytes": round(1 / frac, 3)}


def methods_run(model, calib, tok, ids: torch.Tensor, cache_len: int, args, result: dict[str, Any]) -> None:
    """Dense compiled and each of ``--methods`` at each ``--sparsity``, each on its own copy of
    the model, compiled, then timed in interleaved rounds; ``vs_dense`` against the first."""
    import copy
    import os

    import actsparse
    from benchmarks.e2e import ABLATIONS

    specs: list[tuple[str, Any, Any, Any]] = [("dense (inductor)", model, "inductor", None)]
    for method in args.methods:
        for s in args.sparsity:
            plan = actsparse.calibrate(model, calib, method=method, sparsity=s, tokenizer=tok,
                                       token_budget=args.calib_tokens)
            m = copy.deepcopy(model)
            actsparse.prepare(m, plan)
            specs.append((f"{method} {s:.0%}", m, actsparse.backend(plan), plan))
            for a in args.ablate:  # a copy of its own, so each compiled step keeps its own graphs
                opt, suffix = ABLATIONS[a]
                m = copy.deepcopy(model)
                actsparse.prepare(m, plan)
                specs.append((f"{method} {s:.0%} {suffix}", m, actsparse.backend(plan, **{opt: False}), plan))
    result.update(cpu=result["device"], loadavg_start=[round(x, 2) for x in os.getloadavg()], note=LOAD_NOTE)
    compiled = {}
    for name, m, be, _ in specs:
        print(f"[cpu_decode] compiling {name} ...", file=sys.stderr, flush=True)
        compiled[name] = compile_variant(m, be, ids, args.new_tokens, cache_len)
    timed, load = time_interleaved(compiled, ids, args.new_tokens, args.repeats)
    result["loadavg_rounds"] = load
    dense = timed[specs[0][0]]["tokens_per_s"]
    for name, m, _, plan in specs:
        t = timed[name]
        row = {"variant": name, "batch": 1, "sparsity": plan.target if plan is not None else 0.0,
               "tok_s": round(t["tokens_per_s"], 3), "vs_dense": round(t["tokens_per_s"] / dense, 4),
               "runs": [round(x, 3) for x in t["runs"]],
               "compile_and_first_s": round(compiled[name]["compile_and_first_s"], 1)}
        if plan is not None:
            row["options"] = {ABLATIONS[a][0]: False for a in args.ablate if name.endswith(" " + ABLATIONS[a][1])}
            row["plan"] = {"method": plan.method, "target": plan.target, "overall_sparsity": plan.overall_sparsity}
            row["greedy_prefix_agreement_with_masked_eager"] = agreement(
                t["tokens"], reference_tokens(m, plan, ids, args.new_tokens, cache_len))
        result["rows"].append(row)


def relufied_run(model, calib, tok, ids: torch.Tensor, cache_len: int, args, result: dict[str, Any]) -> None:
    """Original dense, TEAL plans (``--sparsity``), relufied dense and relufied exact: each on
    its own copy of the model, compiled, then timed in interleaved rounds."""
    import copy
    import os

    import actsparse
    from actsparse.train import read_adapters, rebuild

    meta = read_adapters(args.adapters)[1]
    relu_dense, plan = rebuild(copy.deepcopy(model), args.adapters)
    relu_dense.eval()
    result.update(cpu=result["device"], adapters=os.path.basename(args.adapters), relufy_variant=meta.get("variant"))
    specs: list[tuple[str, Any, Any, Any, float]] = [("dense (inductor)", model, "inductor", None, 0.0)]
    for s in args.sparsity:
        tplan = actsparse.calibrate(model, calib, method=args.method, sparsity=s, tokenizer=tok,
                                    token_budget=args.calib_tokens)
        m = copy.deepcopy(model)
        actsparse.prepare(m, tplan)
        specs.append((f"{args.method} {s:.0%} (sparse)", m, actsparse.backend(tplan), tplan, s))
    label = f"relufied {meta.get('variant')}"
    extra = []
    for s_in in getattr(args, "input_sparsity", []):  # thresholds on the other linears, calibrated on relu
        from actsparse.train import with_input_thresholds

        tplan = actsparse.calibrate(relu_dense, calib, method=args.method, sparsity=s_in, tokenizer=tok,
                                    token_budget=args.calib_tokens)
        extra.append((f"{label} exact + {args.method} {s_in:.0%} inputs (sparse)",
                      with_input_thresholds(plan, tplan), s_in))
    interleaved_relu_run(specs, relu_dense, plan, label, ids, cache_len, args, result, extra)


def interleaved_relu_run(specs: list, relu_dense, plan, label: str, ids: torch.Tensor, cache_len: int, args,
                         result: dict[str, Any], extra: tuple = ()) -> None:
    """``specs`` (name, model, backend, plan, sparsity) plus the relufied model dense compiled and
    with its exact plan (a copy, prepared), and with each ``extra`` (name, plan, input sparsity)
    plan; compiled, timed in rounds, one row each. ``vs_dense`` is against the first variant."""
    import copy
    import os

    import actsparse
    from actsparse.train import mlp_sparsity

    sp = mlp_sparsity(relu_dense, ids)
    relu_s = sum(sp.values()) / len(sp)
    dense_name = f"{label} dense (inductor)"
    bounded = {}  # sparse relufied variants: name -> input sparsity of their plan
    specs = list(specs) + [(dense_name, relu_dense, "inductor", None, relu_s)]
    for name, p, s_in in ((f"{label} exact (sparse)", plan, 0.0), *extra):
        m = copy.deepcopy(relu_dense)
        actsparse.prepare(m, p)
        specs.append((name, m, actsparse.backend(p), p, relu_s))
        bounded[name] = s_in
    result.update(loadavg_start=[round(x, 2) for x in os.getloadavg()], note=LOAD_NOTE)
    compiled = {}
    for name, m, be, _, _ in specs:
        print(f"[cpu_decode] compiling {name} ...", file=sys.stderr, flush=True)
        compiled[name] = compile_variant(m, be, ids, args.new_tokens, cache_len)
    timed, load = time_interleaved(compiled, ids, args.new_tokens, args.repeats)
    result["loadavg_rounds"] = load
    dense = timed[specs[0][0]]["tokens_per_s"]
    rdense = timed[dense_name]["tokens_per_s"]
    for name, m, be, p, s in specs:
        t = timed[name]
        row = {"variant": name, "batch": 1, "sparsity": round(s, 4), "tok_s": round(t["tokens_per_s"], 3),
               "vs_dense": round(t["tokens_per_s"] / dense, 4), "runs": [round(x, 3) for x in t["runs"]],
               "compile_and_first_s": round(compiled[name]["compile_and_first_s"], 1), "tokens": t["tokens"]}
        if name.startswith(label):
            row["vs_relufied_dense"] = round(t["tokens_per_s"] / rdense, 4)
            row["sparsity_note"] = "MLP sparsity (exact zeros of the activation) over the prompt"
        elif p is not None:
            row["sparsity_note"] = "TEAL target sparsity of the plan"
        if name in bounded:
            row.update(weight_bytes_bound(m, s, bounded[name]))
            if bounded[name]:
                row["input_sparsity"] = bounded[name]
            row["greedy_prefix_agreement_with_relufied_dense"] = agreement(t["tokens"], timed[dense_name]["tokens"])
        if p is not None:
            c = compiled[name]
            row["check_vs_masked_eager"] = check_against_reference(m, c["step"], p, ids, args.new_tokens,
                                                                   cache_len, c["cache"])
        result["rows"].append(row)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]


def random_relu_run(args, result: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """A random model of real Llama-3 shapes with its MLP activation swapped for ReLU (no
    fine-tune: random gate pre-activations are symmetric, so about half the neurons are zero):
    dense compiled against its exact plan. Returns the prompt ids and cache length used."""
    import actsparse
    from actsparse.models import shaped

    model = shaped(args.random_relu, dtype=torch.float32, device="cpu", num_layers=args.layers)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=gen)
    cache_len = ids.shape[1] + args.new_tokens + 8
    result.update(cpu=result["device"], layers=model.config.num_hidden_layers, prompt_tokens=ids.shape[1])
    if args.mlp_sparsity is None:
        relu, plan = actsparse.relufy(model, "relu")
        result.update(model=f"random {args.random_relu}-shaped, ReLU MLPs",
                      weights="random N(0, 1/fan_in), no fine-tune: ReLU zeroes about half the neurons")
        interleaved_relu_run([], relu, plan, "relu", ids, cache_len, args, result)
        return ids, cache_len
    import copy

    calib = torch.randint(0, model.config.vocab_size, (1, 512), generator=gen)
    relu, plan = actsparse.relufy(copy.deepcopy(model), "shifted-relu", tokens=calib, sparsity=args.mlp_sparsity)
    extra = []
    for s_in in args.input_sparsity:  # TEAL on the linears the exact rule leaves dense, calibrated on relu
        from actsparse.train import with_input_thresholds

        teal = actsparse.calibrate(relu, calib, method="teal", sparsity=s_in)
        extra.append((f"shifted-relu exact + teal {s_in:.0%} inputs (sparse)", with_input_thresholds(plan, teal), s_in))
    result.update(model=f"random {args.random_relu}-shaped, shifted-ReLU MLPs",
                  weights=f"random N(0, 1/fan_in); shifted ReLU calibrated to {args.mlp_sparsity:.0%} MLP zeros on "
                          "512 random tokens, standing in for a fine-tuned relufied model")
    interleaved_relu_run([("dense (inductor)", model, "inductor", None, 0.0)], relu, plan, "shifted-relu", ids,
                         cache_len, args, result, extra)
    return ids, cache_len


if __name__ == "__main__":
    raise SystemExit(main())
