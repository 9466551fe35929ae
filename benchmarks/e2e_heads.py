"""End-to-end decode with head routing, across batch sizes and context lengths, one GPU run.

    python -m benchmarks.e2e_heads --out $OUT/e2e_heads_h200.json

A random-weight model of Llama-3-8B shapes in bf16 (speed depends on shapes, not values; the
routers are random too: which heads run does not change the time). Per (batch, context) the KV
cache is filled directly (random keys and values, its length counter set to the context), so no
prefill runs; then every variant decodes ``--new-tokens`` tokens from that context in a minimal
loop (``benchmarks.e2e.lean_decode_rate``'s loop: the compiled step under CUDA graphs, greedy
argmax on the device, no host sync per token). Variants: dense ``backend="inductor"`` with CUDA
graphs (the baseline, same run); head routing at KV-group density 1.0 (no head skipped: what
replacing HF's repeat_kv + SDPA with the kernel alone changes) and 0.5; a 50% TEAL plan alone
and with heads at 0.5 (batch 1). ``ideal_x`` is the bytes model: (weights + KV) over
(weights read + the selected KV).

``--loop generate`` times HF ``generate`` (static cache, ``compile_config`` with the same
backend) and ``--loop greedy`` ``actsparse.greedy_decode`` instead: both prefill a real random
prompt of the context's length (eagerly, dense, as they do), and the time of one token is
subtracted from that of ``--new-tokens`` + 1, so the prefill drops out.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.harness import command_line, copy_bandwidth, log, result, sync, write_json

MATRIX = {  # (batch, context): variants, in the order they run (a run out of time keeps the first)
    (16, 4096): ["dense", "heads-1.0", "heads-0.5"],
    (64, 4096): ["dense", "heads-0.5"],
    (16, 16384): ["dense", "heads-0.5"],
    (1, 1024): ["dense", "teal-50%", "teal-50%+heads-0.5"],
    (4, 4096): ["dense", "heads-0.5"],
    (1, 16384): ["dense", "heads-0.5"],
}


def fill_cache(model, cache, batch: int, length: int, device) -> None:
    """Initialise ``cache`` with one real token, then fill it with random K/V up to ``length``."""
    with torch.no_grad():
        model(input_ids=torch.zeros(batch, 1, dtype=torch.long, device=device), past_key_values=cache,
              cache_position=torch.zeros(1, dtype=torch.long, device=device))
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
    set_length(cache, length)


def set_length(cache, length: int) -> None:
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def decode_rate(model, backend, batch: int, context: int, new_tokens: int, repeats: int) -> float:
    from transformers import StaticCache

    device = next(model.parameters()).device
    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=backend, fullgraph=True)
    cache = StaticCache(config=model.config, max_cache_len=context + new_tokens + 8)
    fill_cache(model, cache, batch, context, device)
    tok0 = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def run() -> float:
        set_length(cache, context)
        tok, pos = tok0.clone(), torch.tensor([context], device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(new_tokens):
                tok = step(input_ids=tok, past_key_values=cache, cache_position=pos).logits[:, -1:].argmax(-1)
                pos += 1
        sync(device)
        return new_tokens * batch / (time.perf_counter() - t0)

    run()
    run()
    rates = sorted(run() for _ in range(repeats))
    del cache
    return rates[len(rates) // 2]


def loop_rate(loop: str, model, plan, backend, batch: int, context: int, new_tokens: int, repeats: int) -> float:
    """Tokens/s of one variant in the chosen decode loop."""
    if loop == "minimal":
        return decode_rate(model, backend, batch, context, new_tokens, repeats)
    from benchmarks.e2e import greedy_decode_rate
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda", generator=g)
    if loop == "greedy":
        from actsparse.decode import release_cache
        try:
            return greedy_decode_rate(model, backend, ids, new_tokens, repeats)
        finally:
            release_cache(model)
    from transformers import CompileConfig

    from benchmarks import decode
    from benchmarks.decode import time_decode
    decode._CACHES.clear()  # one cache per variant: a pair's long cache would otherwise stay
    cfg = (CompileConfig(backend="inductor", mode="reduce-overhead", fullgraph=True) if plan is None else
           CompileConfig(backend=backend, mode=None, fullgraph=True))
    torch._dynamo.reset()
    return time_decode(model, ids, new_tokens, repeats, compile_config=cfg)["tokens_per_s"]


def plans(model, names, calib):
    import actsparse
    from actsparse.calibration.heads import random_head_routing
    from actsparse.plan import HeadRouting
    from benchmarks.e2e import calibrate_on_tokens

    out = {}
    teal = calibrate_on_tokens(model, calib, 0.5) if any("teal" in n for n in names) else None
    for n in names:
        if n == "dense":
            out[n] = None
            continue
        plan = actsparse.SparsityPlan(model=actsparse.plan.fingerprint(model), method=n)
        if "teal" in n:
            plan.thresholds = dict(teal.thresholds)
            plan.target = 0.5
        if "heads" in n:
            dens = float(n.split("heads-")[1])
            plan.add(random_head_routing(model, dens).rule(HeadRouting))
        out[n] = plan
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e_heads", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="+", default=None, help="batch:context pairs to run (default: all)")
    p.add_argument("--variants", nargs="+", default=None, help="variants to run for every pair (default: the matrix's)")
    p.add_argument("--budget-s", type=float, default=520)
    p.add_argument("--loop", choices=["minimal", "generate", "greedy"], default="minimal",
                   help="the minimal loop on a directly filled cache, HF generate, or actsparse.greedy_decode")
    a = p.parse_args(argv)
    t_start = time.time()
    import actsparse
    from actsparse.models import shaped
    from benchmarks.decode import weight_bytes
    from benchmarks.e2e import _dense_backend

    model = shaped(a.model, dtype=torch.bfloat16, device="cuda", num_layers=a.layers)
    cfg = model.config
    bw = copy_bandwidth()
    wb = weight_bytes(model)
    res = result(command_line("benchmarks.e2e_heads", argv), [], model=a.model, layers=cfg.num_hidden_layers,
                 weight_bytes=wb, copy_bandwidth_TBps=bw / 1e12, new_tokens=a.new_tokens, loop=a.loop)
    model.generation_config.pad_token_id = cfg.pad_token_id
    g = torch.Generator(device="cuda").manual_seed(0)
    calib = torch.randint(0, cfg.vocab_size, (1, 512), device="cuda", generator=g)
    matrix = MATRIX if a.only is None else {tuple(map(int, s.split(":"))): MATRIX.get(
        tuple(map(int, s.split(":"))), ["dense", "heads-0.5"]) for s in a.only}
    if a.variants:
        matrix = {k: list(a.variants) for k in matrix}
    all_names = sorted({n for v in matrix.values() for n in v})
    ps = plans(model, all_names, calib)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    lin = sum(m.weight.numel() * 2 for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
    for (batch, ctx), names in matrix.items():
        kv = 2.0 * batch * cfg.num_key_value_heads * ctx * head_dim * 2 * cfg.num_hidden_layers
        dense_rate = None
        for name in names:
            if time.time() - t_start > a.budget_s:
                res.setdefault("skipped", []).append(f"{name} batch {batch} context {ctx}: out of time")
                continue
            plan = ps[name]
            t0 = time.time()
            if plan is None:
                be = _dense_backend()
            else:
                actsparse.prepare(model, plan)
                be = actsparse.backend(plan, cudagraphs=True)
            try:
                rate = loop_rate(a.loop, model, plan, be, batch, ctx, a.new_tokens, a.repeats)
            except Exception as e:  # noqa: BLE001 - record and go on: a run cut short keeps the rest
                res.setdefault("errors", []).append(f"{name} batch {batch} context {ctx}: {type(e).__name__}: {e}")
                log(f"ERROR {name} b={batch} ctx={ctx}: {type(e).__name__}: {e}")
                torch.cuda.empty_cache()
                continue
            dens = float(name.split("heads-")[1]) if "heads" in name else 1.0
            s_lin = 0.5 if "teal" in name else 0.0
            read = wb - s_lin * lin + dens * kv
            row = dict(variant=name, loop=a.loop, batch=batch, context=ctx, head_density=dens, sparsity=s_lin, tok_s=rate,
                       kv_bytes=kv, kv_share=kv / (wb + kv), ideal_x=(wb + kv) / read, seconds=time.time() - t0)
            if plan is None:
                dense_rate = rate
            row["vs_dense"] = rate / dense_rate if dense_rate else None
            res["rows"].append(row)
            write_json(a.out, res)
            log(f"b={batch:3d} ctx={ctx:6d} {name:>20}: {rate:9.1f} tok/s  x{row['vs_dense'] or 0:.2f}  "
                f"(ideal x{row['ideal_x']:.2f}, KV share {row['kv_share']:.2f})  {row['seconds']:.0f}s")
            torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t_start
    write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
