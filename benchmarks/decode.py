"""Decode speed: dense torch.compile against the sparse backend, in the same run.

Tokens/s of greedy decoding with HF ``generate`` and a static cache. On a CUDA device HF
compiles the decode step itself (``compile_config``; CUDA graphs for both); on the CPU the
model's ``forward`` is compiled here, since HF compiles only on GPUs. Decode time is
isolated from prefill by timing ``n + 1`` and ``1`` new tokens and taking the difference.

    python -m benchmarks.decode --model smollm2-135m --sparsity 0.5 --out benchmarks/results/decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import copy_bandwidth


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CACHES: dict[tuple[int, int, int], Any] = {}


def _generate(model, ids, n: int, compile_config=None, cache_len: int | None = None):
    """Greedy generate with one static cache of a fixed length, reset between calls.

    Every call (n new tokens or one) then sees the same shapes and the same cache object, so
    the compiled graphs are reused: a new cache object per call makes Dynamo recompile.
    """
    from transformers import StaticCache

    length = cache_len or ids.shape[1] + n + 1
    key = (id(model), ids.shape[0], length)
    cache = _CACHES.get(key)
    if cache is None:
        cache = _CACHES[key] = StaticCache(config=model.config, max_cache_len=length)
    cache.reset()
    kw: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              past_key_values=cache)
    if compile_config is not None:
        kw["compile_config"] = compile_config
    return model.generate(ids, **kw)


def time_decode(model, ids: torch.Tensor, new_tokens: int, repeats: int = 3,
                compile_config=None) -> dict[str, float]:
    """Median decode tokens/s over ``repeats`` runs, after one warm-up run (compilation)."""
    device = ids.device
    L = ids.shape[1] + new_tokens + 2
    with torch.no_grad():
        _generate(model, ids, new_tokens, compile_config, L)
        _generate(model, ids, 1, compile_config, L)
        rates, outs = [], None
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            outs = _generate(model, ids, new_tokens + 1, compile_config, L)
            _sync(device)
            t1 = time.perf_counter()
            _generate(model, ids, 1, compile_config, L)
            _sync(device)
            t2 = time.perf_counter()
            decode = (t1 - t0) - (t2 - t1)
            rates.append(new_tokens * ids.shape[0] / max(decode, 1e-9))
    return {"tokens_per_s": statistics.median(rates), "runs": rates,
            "tokens": outs[:, ids.shape[1]:].tolist() if outs is not None else None}


def weight_bytes(model) -> int:
    """Bytes of the weights decode reads per token (all parameters except the input embedding)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p is not emb or tied)


def _cpu_variant(model, backend, ids, n, repeats):
    orig = model.forward
    torch._dynamo.reset()
    model.forward = torch.compile(orig, backend=backend)
    try:
        return time_decode(model, ids, n, repeats)
    finally:
        model.forward = orig


def run(model, tokenizer, plans: dict[str, Any], *, prompt: str, new_tokens: int, batch: int,
        repeats: int) -> dict[str, Any]:
    """Time dense and each plan on one model; returns a JSON-able dict."""
    import actsparse
    from transformers import CompileConfig

    device = next(model.parameters()).device
    ids = tokenizer([prompt] * batch, return_tensors="pt").input_ids.to(device)
    rows = []
    cuda = device.type == "cuda"
    for name, plan in [("dense", None), *plans.items()]:
        print(f"[decode] {name} ...", file=sys.stderr, flush=True)
        if cuda:
            cfg = CompileConfig(backend="inductor", mode="reduce-overhead", fullgraph=True) if plan is None \
                else CompileConfig(backend=actsparse.backend(plan, cudagraphs=True), mode=None, fullgraph=True)
            if plan is not None:
                actsparse.prepare(model, plan)
            torch._dynamo.reset()
            r = time_decode(model, ids, new_tokens, repeats, compile_config=cfg)
        else:
            be = "inductor" if plan is None else actsparse.backend(plan)
            if plan is not None:
                actsparse.prepare(model, plan)
            r = _cpu_variant(model, be, ids, new_tokens, repeats)
        r["variant"] = name
        if plan is not None:
            r["plan"] = {"method": plan.method, "target": plan.target,
                         "overall_sparsity": plan.overall_sparsity}
        rows.append(r)
    dense = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / dense
    wb = weight_bytes(model)
    bw = copy_bandwidth() if device.type == "cuda" else None
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "batch": batch, "new_tokens": new_tokens, "prompt_tokens": ids.shape[1],
        "weight_bytes": wb, "copy_bandwidth_Bps": bw,
        "roofline_tokens_per_s": bw / wb * batch,
        "rows": rows,
    }


def decoder_linears(model) -> list[str]:
    """Every linear layer except the output head: what a uniform plan masks."""
    from actsparse.plan import linear_weights

    head = model.get_output_embeddings()
    return [n for n in linear_weights(model) if model.get_submodule(n) is not head]


def uniform_plan(model, tokenizer, sparsity: float, text: str, max_tokens: int = 2048):
    """TEAL thresholds at one quantile per linear input, fit on ``text``.

    A self-contained plan for speed runs that do not need the calibration module.
    """
    import actsparse

    names = decoder_linears(model)
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: samples[n].append(a[0].detach().abs().float().flatten()[:200_000].cpu()))
        for n in names]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(next(model.parameters()).device)
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[1], 512):
                model(ids[:, i:i + 512])
    finally:
        for h in hooks:
            h.remove()
    thresholds = {n: float(torch.quantile(torch.cat(v)[:1_000_000], sparsity)) for n, v in samples.items()}
    plan = actsparse.SparsityPlan.from_thresholds(model, thresholds, method="teal-uniform", target=sparsity)
    plan.overall_sparsity = sparsity
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from actsparse import models
    from actsparse.eval import load_wikitext2, wikitext2_articles

    model, tok = models.load(args.model)
    arts = wikitext2_articles(load_wikitext2(args.data))
    calib = "\n".join(arts[:5])
    import actsparse

    zero = {n: 0.0 for n in decoder_linears(model)}
    plans = {f"sparse-{s:.0%}": uniform_plan(model, tok, s, calib) if s > 0 else
             actsparse.SparsityPlan.from_thresholds(model, zero, method="teal-uniform", target=0.0)
             for s in args.sparsity}
    prompt = arts[20][:400]
    res = run(model, tok, plans, prompt=prompt, new_tokens=args.new_tokens, batch=args.batch,
              repeats=args.repeats)
    res["model"] = args.model
    res["command"] = "python -m benchmarks.decode " + " ".join(argv if argv is not None else sys.argv[1:])
    res["plan_note"] = "uniform TEAL quantile thresholds on every decoder linear input, fit on WikiText-2 articles 0-4"
    for r in res["rows"]:
        print(f"{r['variant']:>12}: {r['tokens_per_s']:8.2f} tok/s  x{r['speedup']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
