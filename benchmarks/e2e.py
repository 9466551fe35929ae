"""End-to-end GPU decode: dense Inductor + CUDA graphs against the sparse backend, one run.

A random-weight model of real Llama-3 shapes in bf16 (weights cannot travel to the GPU
machine; speed depends on shapes, not values), thresholds calibrated on that model to each
target sparsity, HF ``generate`` with a static cache and ``compile_config`` (CUDA graphs for
both variants). First a correctness check on a small model of the same widths: compiled
sparse logits against the eager masked reference. Rows are written to the JSON as they
finish, so a run cut short keeps what it measured. Each row carries ``tok_s``, ``vs_dense`` and
``limit_tok_s``: the weight-bandwidth limit at that sparsity (``benchmarks.weight_limit``), so
every figure says how far it is from the ideal (``frac_of_limit``).

    python -m benchmarks.e2e --out benchmarks/results/e2e_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def calibrate_on_tokens(model, ids: torch.Tensor, sparsity: float):
    """Uniform TEAL plan: per linear input, the |x| quantile at ``sparsity`` on ``ids``."""
    import actsparse
    from benchmarks.decode import decoder_linears

    names = decoder_linears(model)
    got: dict[str, torch.Tensor] = {}
    frac: dict[str, float] = {}

    def hook(name):
        def h(mod, args):
            x = args[0].detach().abs().float().flatten()
            if x.numel() > 4_000_000:
                x = x[torch.randperm(x.numel(), device=x.device)[:4_000_000]]
            got[name] = q = torch.quantile(x, sparsity)
            frac[name] = float((x <= q).float().mean())
        return h

    hs = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hs:
            h.remove()
    plan = actsparse.SparsityPlan.from_thresholds(
        model, {n: float(t) for n, t in got.items()}, method="teal-uniform", target=sparsity)
    plan.overall_sparsity = sparsity
    plan.measured.update(frac)  # each input's sparsity on the calibration tokens
    plan.info["calibration"] = f"{ids.numel()} random tokens through the same random-weight model"
    return plan


def lean_decode_rate(model, backend, ids: torch.Tensor, new_tokens: int, repeats: int = 3) -> float:
    """Tokens/s of a minimal decode loop (gpt-fast style): the compiled forward under CUDA
    graphs, greedy argmax, a static cache, and nothing else per token.

    HF ``generate`` adds a few milliseconds of Python per token, which on an 8B model is
    close to half the time; this loop shows what the kernels themselves change. Nothing in
    it waits for the GPU (the position advances on the device, as in gpt-fast), so the host
    queues the next step while the GPU runs this one.
    """
    from transformers import StaticCache

    b, n = ids.shape
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=backend, fullgraph=True)
    # One cache for every run, zeroed in between: a new cache at new addresses would make the
    # CUDA-graph tree record the step again inside the timed loop (benchmarks/studies/gpu_greedy_check.py).
    cache = StaticCache(config=model.config, max_cache_len=n + new_tokens + 1)

    def run() -> float:
        cache.reset()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device=ids.device))
            tok = out.logits[:, -1:].argmax(-1)
            pos = torch.tensor([n], device=ids.device)
            sync()
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                logits = step(input_ids=tok, past_key_values=cache, cache_position=pos).logits
                tok = logits[:, -1:].argmax(-1)
                pos += 1  # on the device: no host-to-device copy, which would wait for the GPU
            sync()
        return new_tokens * b / (time.perf_counter() - t0)

    run()
    run()
    rates = sorted(run() for _ in range(max(repeats, 1)))
    return rates[len(rates) // 2]


def greedy_decode_rate(model, backend, ids: torch.Tensor, new_tokens: int, repeats: int = 3) -> float:
    """Tokens/s of ``actsparse.greedy_decode`` (eager prefill, compiled steps, no host sync per
    token): the time of ``new_tokens + 1`` tokens minus that of 1 token, so the prefill and
    the first token drop out."""
    import actsparse

    # One cache length for both timings: by default 1 and new_tokens + 1 tokens fall in
    # different length buckets, and each call would make a new cache and record the step's
    # CUDA graph again inside the timed region.
    length = ids.shape[1] + new_tokens + 1

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        actsparse.greedy_decode(model, ids, n, backend=backend, ignore_eos=True, cache_length=length)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    torch._dynamo.reset()
    timed(new_tokens + 1)
    timed(new_tokens + 1)
    rates = sorted(new_tokens * ids.shape[0] / (timed(new_tokens + 1) - timed(1)) for _ in range(repeats))
    return rates[len(rates) // 2]


def check_correctness(sparsity: float = 0.5, dtype: torch.dtype = torch.float32) -> dict:
    """Compiled sparse (CUDA graphs) against the eager masked model, on 8B-wide 2 layers.

    fp32 by default: in bf16, Inductor's fused norm and the eager one round some inputs to
    values one step apart on either side of a threshold; those flips grow through the layers
    and hide what the check is for (a wrong mask or kernel). The timed rows stay bf16."""
    import actsparse
    from actsparse.models import shaped
    from transformers import StaticCache

    model = shaped("llama3-tiny", dtype=dtype, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 128000, (1, 64), device="cuda", generator=g)
    plan = calibrate_on_tokens(model, ids, sparsity)

    masking = {"on": False}  # the reference masks decode steps only: the prefill is dense everywhere

    def run(fwd, steps=6):
        # The prefill runs eagerly and every step gets a contiguous token, as in the decode loops
        # we time: compiling the prefill into a fresh StaticCache, then stepping with strided
        # slices of ``ids``, recompiled with a symbolic stride and crashed Inductor's launcher
        # (torch 2.11, transformers 5.17; benchmarks/results/e2e_limit_h100.json's note).
        cache = StaticCache(config=model.config, max_cache_len=80)
        outs = []
        with torch.no_grad():
            model(input_ids=ids[:, :16], past_key_values=cache, cache_position=torch.arange(16, device="cuda"))
            masking["on"] = True
            for i in range(steps):
                out = fwd(input_ids=ids[:, 16 + i:17 + i].contiguous(), past_key_values=cache,
                          cache_position=torch.tensor([16 + i], device="cuda"))
                outs.append(out.logits.float().clone())
        masking["on"] = False
        return outs

    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, t=t: (torch.where(a[0].abs().float() > t, a[0], torch.zeros((), dtype=a[0].dtype)),)
        if masking["on"] else None)
        for n, t in plan.thresholds.items()]
    ref = run(model.forward)
    for h in hooks:
        h.remove()
    dense = run(model.forward)
    actsparse.prepare(model, plan)
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, backend=actsparse.backend(plan, cudagraphs=True), fullgraph=True)
    got = run(fwd)
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
    rel_dense = max(((a - b).norm() / b.norm()).item() for a, b in zip(dense, ref))
    del model
    torch.cuda.empty_cache()
    return {"dtype": str(dtype).removeprefix("torch."), "max_rel_err_vs_masked_eager": rel,
            "rel_diff_masked_vs_dense": rel_dense,
            "ok": rel < 0.25 * rel_dense}


#: Rewrites the benchmarks can measure by their absence: name -> (backend option, variant suffix).
ABLATIONS = {"gqa": ("gqa_attention", "repeat_kv"), "fuse": ("fuse_gated_product", "unfused")}


def ablation_variants(sparsities, ablate) -> list[tuple[str, float | None, dict]]:
    """(variant, sparsity, backend options) in the order a run cut short should keep: dense
    Inductor (sparsity None), the sparse rows with every rewrite, then each ablation; with
    "gqa", the backend with an empty plan (sparsity 0: the rewrite's own gain)."""
    rows: list[tuple[str, float | None, dict]] = [("dense", None, {})]
    rows += [(f"sparse-{s:.0%}", s, {}) for s in sparsities]
    if "gqa" in ablate:
        rows.append(("dense-gqa", 0.0, {}))
    for a in ablate:
        opt, suffix = ABLATIONS[a]
        rows += [(f"sparse-{s:.0%}-{suffix}", s, {opt: False}) for s in sparsities]
    return rows


def forced_family(family):
    """Every sparse GEMV of the block runs ``family`` (None: the per-key choice)."""
    from actsparse.kernels.triton.sparse_gemv import forced_family as forced

    return forced(family)


def _dense_backend():
    """Dense baseline for the lean loop: Inductor with CUDA graphs."""
    from torch._inductor.compile_fx import compile_fx

    def be(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})
    return be


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.25, 0.4, 0.6])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=520, help="stop starting new rows after this")
    p.add_argument("--lm-head-sparsity", type=float, default=None,
                   help="also mask the LM head's input at this sparsity in every sparse plan (off by default)")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--loop", choices=["generate", "lean", "greedy"], default="generate",
                   help="HF generate with compile_config, a minimal compiled decode loop, or "
                        "actsparse.greedy_decode (the library's loop)")
    p.add_argument("--ablate", nargs="*", choices=list(ABLATIONS), default=[],
                   help="rewrites to measure by their absence: each sparse row again without it (gqa "
                        "also adds the dense model through the backend with an empty plan, the "
                        "rewrite's own gain)")
    p.add_argument("--force-family", nargs="*", choices=["compact", "predicated", "elect"], default=[],
                   help="each sparse row again with every sparse GEMV forced to this kernel family (and the "
                        "correctness check again under it)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t_start = time.time()
    from transformers import CompileConfig

    import actsparse
    from benchmarks.decode import time_decode, weight_bytes
    from benchmarks.harness import copy_bandwidth
    from benchmarks.weight_limit import bytes_per_step, gemv_bandwidth, limit_tok_s
    from actsparse.models import shaped

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"command": "python -m benchmarks.e2e " + " ".join(argv if argv is not None else sys.argv[1:]),
           "gpu": torch.cuda.get_device_name(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "model": args.model, "dtype": "bfloat16", "new_tokens": args.new_tokens, "rows": []}

    def save():
        out.write_text(json.dumps(res, indent=1))

    if args.check:
        res["correctness"] = check_correctness()
        print("correctness:", res["correctness"], flush=True)
        for fam in args.force_family:
            with forced_family(fam):
                res[f"correctness_{fam}"] = check_correctness()
            print(f"correctness ({fam}):", res[f"correctness_{fam}"], flush=True)
        save()
    model = shaped(args.model, dtype=torch.bfloat16, device="cuda", num_layers=args.layers)
    model.generation_config.pad_token_id = model.config.pad_token_id
    res["weight_bytes"] = wb = weight_bytes(model)
    res["copy_bandwidth_Bps"] = bw = copy_bandwidth(1 << 30)
    res["gemv_bandwidth_Bps"] = gemv_bw = gemv_bandwidth()
    res["limit"] = ("limit_tok_s: batch x GEMV bandwidth (cuBLAS, batch 1, bytes read/s) / weight bytes a step "
                    "reads at the plan's calibrated per-layer sparsity (union 1 - s^B over the batch; all of a "
                    "layer the backend runs dense); limit_copy_tok_s: the same over the copy bandwidth")
    g = torch.Generator(device="cuda").manual_seed(0)
    calib = torch.randint(0, 128000, (1, 512), device="cuda", generator=g)
    plans = {s: calibrate_on_tokens(model, calib, s) for s in args.sparsity}
    if args.lm_head_sparsity is not None:
        from actsparse.calibration.lm_head import add_lm_head_sparsity

        for plan in plans.values():
            add_lm_head_sparsity(plan, model, calib, args.lm_head_sparsity, token_budget=calib.numel(),
                                 seq_len=calib.shape[-1], batch_size=1)
    dense_cfg = CompileConfig(backend="inductor", mode="reduce-overhead", fullgraph=True)
    for batch in args.batches:
        ids = torch.randint(0, 128000, (batch, 32), device="cuda", generator=g)
        variants = [(name, None if sp is None else plans.get(sp, actsparse.SparsityPlan()), opts)
                    for name, sp, opts in ablation_variants(args.sparsity, args.ablate)]
        variants += [(f"sparse-{s:.0%}-{fam}", plans[s], {"family": fam})
                     for fam in args.force_family for s in args.sparsity]
        dense_rate = None
        for name, plan, opts in variants:
            if time.time() - t_start > args.budget_s:
                res.setdefault("skipped", []).append(f"{name} batch {batch}: out of time")
                continue
            fam = opts.get("family")
            be_opts = {k: v for k, v in opts.items() if k != "family"}
            if plan is None:
                cfg = dense_cfg
            else:
                actsparse.prepare(model, plan)
                cfg = CompileConfig(backend=actsparse.backend(plan, cudagraphs=True, **be_opts), mode=None,
                                    fullgraph=True)
            torch._dynamo.reset()
            t0 = time.time()
            with forced_family(fam):
                if args.loop in ("lean", "greedy"):
                    be = (actsparse.backend(plan, cudagraphs=True, **be_opts) if plan is not None else
                          _dense_backend())
                    rate = lean_decode_rate if args.loop == "lean" else greedy_decode_rate
                    r = {"tokens_per_s": rate(model, be, ids, args.new_tokens, args.repeats)}
                else:
                    r = time_decode(model, ids, args.new_tokens, args.repeats, compile_config=cfg)
            r.pop("tokens", None)
            r["loop"] = args.loop
            step_bytes = bytes_per_step(model, plan, batch)
            r.update(variant=name, batch=batch, seconds=time.time() - t0, options=opts,
                     roofline_tokens_per_s=bw / wb * batch, sparsity=plan.target or 0.0 if plan is not None else 0.0,
                     tok_s=r["tokens_per_s"], weight_bytes_per_token=step_bytes / batch,
                     limit_tok_s=limit_tok_s(step_bytes, gemv_bw, batch),
                     limit_copy_tok_s=limit_tok_s(step_bytes, bw, batch))
            r["frac_of_limit"] = r["tok_s"] / r["limit_tok_s"]
            if plan is None:
                dense_rate = r["tokens_per_s"]
            else:
                r["target_sparsity"] = plan.target
            if dense_rate:
                r["speedup"] = r["vs_dense"] = r["tokens_per_s"] / dense_rate
            res["rows"].append(r)
            save()
            print(f"batch {batch} {name:>11}: {r['tokens_per_s']:8.1f} tok/s  x{r.get('speedup', 1):.2f}"
                  f"  limit {r['limit_tok_s']:.0f} tok/s ({r['frac_of_limit']:.2f} of it)"
                  f"  ({r['seconds']:.0f}s)", flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
