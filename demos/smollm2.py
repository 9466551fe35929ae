"""The whole story on SmolLM2-135M, on the CPU, in a few minutes: ``python -m demos.smollm2``.

Loads the offline model, generates a completion, calibrates a 50% plan on WikiText-2
articles, compiles the model with ``backend="sparse"``, generates again, and compares
perplexity (on held-out articles) and decode speed against dense ``torch.compile``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

PROMPT = "The history of the printing press"


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--method", default="teal", help="calibration method (default: %(default)s)")
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--data", default=None, help="evaluation data directory (default: $ACTSPARSE_DATA)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the decode timing")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _complete(model, tok, fwd, n: int) -> str:
    ids = tok(PROMPT, return_tensors="pt").input_ids
    orig = model.forward
    model.forward = fwd
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, cache_implementation="static")
    finally:
        model.forward = orig
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _plan(model, tok, args, calib_text: str):
    import actsparse

    return actsparse.calibrate(model, [calib_text], method=args.method, sparsity=args.sparsity,
                               tokenizer=tok, token_budget=4096)


def _decode_rate(model, backend, ids, new_tokens: int = 32) -> float:
    """Tokens/s of greedy decoding through ``model.forward`` compiled with ``backend``."""
    from benchmarks.cpu_decode import time_variant  # the demo reuses the CPU decode benchmark's loop

    row = time_variant(model, backend, ids, new_tokens, repeats=2, max_cache_len=ids.shape[1] + new_tokens + 8)
    return row["tokens_per_s"]


def run_demo(args: argparse.Namespace) -> int:
    import actsparse
    from actsparse import models
    from actsparse.eval import load_wikitext2, perplexity, wikitext2_articles

    t0 = time.time()
    try:
        model, tok = models.load(args.model)
        articles = wikitext2_articles(load_wikitext2(args.data))
    except (ValueError, FileNotFoundError, models.ModelNotInstalledError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    calib_text, eval_text = "\n".join(articles[:8]), "\n".join(articles[10:])
    _say(f"loaded {args.model} in {time.time() - t0:.0f}s "
         f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, fp32, CPU)")

    _say(f"\n[dense] {PROMPT!r} ->\n  {_complete(model, tok, model.forward, args.new_tokens)!r}")
    dense_ppl = perplexity(model, tok, eval_text, max_tokens=args.ppl_tokens, progress=False).ppl
    speed_ids = tok(articles[20][:300], return_tensors="pt").input_ids[:, :64]
    if args.speed:  # dense first, on the weights as loaded (prepare() re-stores them below)
        _say("\ndecode speed, batch 1, static cache, minimal loop (compiling; a minute or two) ...")
        dense_rate = _decode_rate(model, "inductor", speed_ids)

    _say(f"\ncalibrating a {args.sparsity:.0%} plan ({args.method}) on WikiText-2 articles 0-7 ...")
    plan = _plan(model, tok, args, calib_text)
    _say(f"  {plan.summary()}")

    torch._dynamo.reset()
    exact = torch.compile(model.forward, dynamic=True,
                          backend=actsparse.backend(plan, compiler="eager", relayout="off"))
    sparse_ppl = _ppl_with(model, exact, tok, eval_text, args.ppl_tokens)
    actsparse.prepare(model, plan)
    torch._dynamo.reset()
    fast = torch.compile(model.forward, backend=actsparse.backend(plan))
    _say(f"\n[sparse] {PROMPT!r} ->\n  {_complete(model, tok, fast, args.new_tokens)!r}")
    _say(f"\nWikiText-2 perplexity, articles 10+ ({args.ppl_tokens} tokens, window 512): "
         f"dense {dense_ppl:.2f} -> sparse {sparse_ppl:.2f}")

    if args.speed:
        sparse_rate = _decode_rate(model, actsparse.backend(plan), speed_ids)
        _say(f"\ndecode speed: dense torch.compile {dense_rate:.1f} tokens/s, "
             f"sparse {sparse_rate:.1f} tokens/s (x{sparse_rate / dense_rate:.2f})")
    _say(f"\ndone in {time.time() - t0:.0f}s")
    return 0


def _ppl_with(model, fwd, tok, text: str, max_tokens: int) -> float:
    from actsparse.eval import perplexity

    orig = model.forward
    model.forward = fwd
    try:
        return perplexity(model, tok, text, max_tokens=max_tokens, progress=False).ppl
    finally:
        model.forward = orig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demos.smollm2", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
