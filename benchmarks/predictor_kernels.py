"""GPU timing of the predicted-sparse MLP kernel against the CATS kernel and dense, one run.

    PYTHONPATH=. python3 -m benchmarks.predictor_kernels --out $OUT/predictor_kernels_h100.json

Llama-3-8B MLP shapes (d 4096, 14336 neurons, bf16, SiLU), batch 1 (and small batches), every
kernel in CUDA graphs of several back-to-back calls with rotating inputs (bench.kernels'
helpers). Rows per sparsity s:

* dense: ``down(silu(gate x) * up x)`` through cuBLAS;
* cats: the CATS kernel at threshold quantile s (gate read in full, up/down at s);
* predicted: the predicted-MLP kernel on a random per-row mask of density 1 - s (gate, up and
  down at s), alone and with its predictor (rank r: two cuBLAS GEMVs, then the top-k or the
  logit-threshold selection), the whole cost of the method per layer.

Correctness: each kernel against an fp32 reference on the same inputs (relative L2 error).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8)
BATCHES = (1, 4)


def run(d: int, f: int, rank: int, batches, sparsities, log) -> list[dict]:
    from benchmarks.harness import N_SETS, bench_calls, rel_err
    from benchmarks.kernels import CATS_CALLS
    from actsparse.ops.reference import select
    from actsparse.kernels.triton import gated_mlp as gm
    from actsparse.ops.reference import gated_mlp_reference, predicted_mlp_reference

    torch.manual_seed(0)
    mk = lambda r, c: (torch.randn(r, c, device="cuda") * 0.02).to(torch.bfloat16)  # noqa: E731
    wg, wu, wd = mk(f, d), mk(f, d), mk(d, f)
    wd_im = wd.t().contiguous().t()
    w1, w2 = mk(rank, d), mk(f, rank)
    b2 = torch.zeros(f, device="cuda", dtype=torch.bfloat16)
    rows = []
    for M in batches:
        xs = [torch.randn(M, d, device="cuda", dtype=torch.bfloat16) for _ in range(N_SETS)]

        def dense(x):
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

        t_dense = bench_calls([lambda i=i: dense(xs[i % N_SETS]) for i in range(CATS_CALLS)])
        g_all = torch.cat([F.silu(x.float() @ wg.float().t()).abs().flatten() for x in xs])
        t_pred_only = bench_calls([lambda i=i: F.linear(F.linear(xs[i % N_SETS], w1), w2, b2)
                                   for i in range(CATS_CALLS)])
        for s in sparsities:
            keep = max(1, int(round((1 - s) * f)))
            g = torch.Generator(device="cuda").manual_seed(int(s * 100) + M)
            masks = [torch.rand(M, f, device="cuda", generator=g) >= s for _ in range(N_SETS)]
            thr = float(torch.quantile(g_all[: 1 << 24].float(), s)) if s > 0 else 0.0
            # correctness
            x0, m0 = xs[0], masks[0]
            ref = predicted_mlp_reference(x0.float(), m0, wg.float(), wu.float(), wd.float(), None, None, None, "silu")
            y = gm.launch_gated_mlp(x0, wg, wu, wd_im, "silu", mask=m0, sparsity_hint=s)
            err = rel_err(y, ref)
            yc = gm.launch_gated_mlp(x0, wg, wu, wd_im, "silu", threshold=thr, sparsity_hint=s)
            err_c = rel_err(yc, gated_mlp_reference(x0.float(), wg.float(), wu.float(), wd.float(), None, None, None, "silu", thr))
            # timings
            t_cats = bench_calls([lambda i=i: gm.launch_gated_mlp(xs[i % N_SETS], wg, wu, wd_im, "silu", threshold=thr,
                                                                       sparsity_hint=s) for i in range(CATS_CALLS)])
            t_pred = bench_calls([lambda i=i: pk.launch_predicted_mlp(xs[i % N_SETS], masks[i % N_SETS], wg, wu, wd_im,
                                                                      "silu", sparsity_hint=s) for i in range(CATS_CALLS)])

            # the logit threshold calibrated like the plans': the quantile s of the logits
            lg_all = torch.cat([F.linear(F.linear(x, w1), w2, b2).float().flatten() for x in xs])
            lthr = float(torch.quantile(lg_all[: 1 << 24], s)) if s > 0 else -1e30
            realized = [1.0 - float(select(F.linear(F.linear(x, w1), w2, b2), keep, lthr, False).float().mean())
                        for x in xs]

            def full(i, topk):
                x = xs[i % N_SETS]
                logits = F.linear(F.linear(x, w1), w2, b2)
                mask = select(logits, keep, lthr, topk)
                return gm.launch_gated_mlp(x, wg, wu, wd_im, "silu", mask=mask, sparsity_hint=s)

            t_full_topk = bench_calls([lambda i=i: full(i, True) for i in range(CATS_CALLS)])
            t_full_thr = bench_calls([lambda i=i: full(i, False) for i in range(CATS_CALLS)])
            row = dict(M=M, d=d, f=f, rank=rank, sparsity=s, dense_us=t_dense, cats_us=t_cats,
                       predicted_kernel_us=t_pred, predictor_us=t_pred_only,
                       predicted_with_topk_us=t_full_topk, predicted_with_threshold_us=t_full_thr,
                       speedup_cats=t_dense / t_cats, speedup_predicted_kernel=t_dense / t_pred,
                       speedup_predicted_topk=t_dense / t_full_topk,
                       speedup_predicted_threshold=t_dense / t_full_thr,
                       ideal_cats=3 / (1 + 2 * (1 - s)), ideal_predicted=1 / max(1 - s, 1e-9),
                       threshold_realized_sparsity=sum(realized) / len(realized),
                       rel_err_predicted=err, rel_err_cats=err_c)
            rows.append(row)
            log(f"M={M} s={s:.2f} dense {t_dense:6.1f}us cats {t_cats:6.1f}us (x{row['speedup_cats']:.2f}) "
                f"pred-kernel {t_pred:6.1f}us (x{row['speedup_predicted_kernel']:.2f}) +predictor topk "
                f"{t_full_topk:6.1f}us (x{row['speedup_predicted_topk']:.2f}) thr {t_full_thr:6.1f}us "
                f"(x{row['speedup_predicted_threshold']:.2f}, s {row['threshold_realized_sparsity']:.2f}) predictor alone {t_pred_only:5.1f}us "
                f"err {err:.1e}/{err_c:.1e}")
    return rows


def compile_check(log) -> dict:
    """A tiny llama in bf16 on the GPU with a random predictor plan, compiled by the sparse backend
    (Inductor, CUDA graphs), against the eager reference that applies the same predicted masks."""
    import actsparse
    from actsparse.ops.reference import predicted_mask, predicted_mlp_reference
    from actsparse.models import tiny
    from actsparse.plan import SparsityPlan, fingerprint

    torch.manual_seed(0)
    model = tiny("llama", num_hidden_layers=2).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    preds, tensors = {}, {}
    mods = dict(model.named_modules())
    for name, mod in model.named_modules():
        if hasattr(mod, "gate_proj") and hasattr(mod, "down_proj"):
            n, d = mod.gate_proj.weight.shape
            down = f"{name}.down_proj"
            preds[down] = {"gate": f"{name}.gate_proj", "up": f"{name}.up_proj", "act": "silu", "rank": 8,
                           "in_features": d, "neurons": n, "selection": "threshold", "keep": n // 2, "threshold": 0.0}
            tensors.update({f"{down}.w1": torch.randn(8, d, generator=g), f"{down}.w2": torch.randn(n, 8, generator=g),
                            f"{down}.b2": torch.zeros(n)})
    plan = SparsityPlan(method="predictor", target=0.5, predictors=preds, predictor_tensors=tensors,
                        model=fingerprint(model))
    # down projections input-major before compiling (what actsparse.prepare does for CATS plans)
    from actsparse.compiler.layout import to_input_major

    for down in preds:
        to_input_major(mods[down].weight)
    be = actsparse.backend(plan, cudagraphs=True)
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, backend=be)
    ids = torch.randint(1, model.config.vocab_size, (1, 1), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            got = fwd(input_ids=ids).logits.float()

        handles = []
        for down, sp in preds.items():
            t = {k: v.to("cuda", torch.bfloat16) for k, v in tensors.items() if k.startswith(down)}

            def hook(mlp, args, out, down=down, sp=sp, t=t):
                x = args[0]
                mask = predicted_mask(x, t[f"{down}.w1"], t[f"{down}.w2"], t[f"{down}.b2"], sp["keep"], 0.0, False)
                return predicted_mlp_reference(x, mask, mods[sp["gate"]].weight, mods[sp["up"]].weight,
                                               mods[down].weight, None, None, None, "silu")
            handles.append(mods[down.rsplit(".", 1)[0]].register_forward_hook(hook))
        want = model(input_ids=ids).logits.float()
        for h in handles:
            h.remove()
        dense = model(input_ids=ids).logits.float()
    err = float((got - want).norm() / want.norm())
    diff_dense = float((dense - want).norm() / want.norm())
    rules = sorted({s.rule for s in be.sites if s.rule.startswith("predictor")})
    log(f"compile check: rel err vs eager reference {err:.2e} (dense differs by {diff_dense:.2e}); rules {rules}")
    return {"rel_err": err, "dense_rel_diff": diff_dense, "rules": rules, "ok": err < 2e-2 and bool(rules)}


def markdown(result: dict) -> str:
    lines = [f"# Predicted-sparse MLP kernel on {result['device']}", "",
             f"`{result['command']}`  ", f"torch {result['torch']}, triton {result['triton']}, {result['date']}", "",
             f"Llama-3-8B MLP (d {result['d']}, {result['f']} neurons, bf16, SiLU); predictor rank {result['rank']}. "
             "Microseconds per MLP call, median of CUDA-graph replays of several back-to-back calls with rotating "
             "inputs; speedup over dense cuBLAS. `predicted` = the kernel alone on a random mask of density 1 - s; "
             "`+topk` / `+thr` = with the predictor's two GEMVs and its top-k / logit-threshold selection "
             "(threshold: the logits' s-quantile over the inputs; its realized sparsity in the last column). "
             "Ideal: cats 3 / (1 + 2(1 - s)) (gate read in full), predicted 1 / (1 - s).", "",
             "| M | s | dense us | cats us (x) | predicted us (x) | +topk us (x) | +thr us (x) | ideal cats / pred | "
             "rel err pred / cats | thr realized s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['M']} | {r['sparsity']:.2f} | {r['dense_us']:.1f} | {r['cats_us']:.1f} "
                     f"({r['speedup_cats']:.2f}) | {r['predicted_kernel_us']:.1f} ({r['speedup_predicted_kernel']:.2f}) | "
                     f"{r['predicted_with_topk_us']:.1f} ({r['speedup_predicted_topk']:.2f}) | "
                     f"{r['predicted_with_threshold_us']:.1f} ({r['speedup_predicted_threshold']:.2f}) | "
                     f"{r['ideal_cats']:.2f} / {r['ideal_predicted']:.2f} | "
                     f"{r['rel_err_predicted']:.1e} / {r['rel_err_cats']:.1e} | {r['threshold_realized_sparsity']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predictor_kernels")
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--f", type=int, default=14336)
    p.add_argument("--rank", type=int, default=328, help="predictor rank (default: 8%% of 4096)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--out", default="benchmarks/results/predictor_kernels.json")
    p.add_argument("--compile-check", action="store_true", help="only the compiled end-to-end check")
    args = p.parse_args(argv)
    import triton

    def log(msg):
        print(msg, flush=True)

    if args.compile_check:
        return 0 if compile_check(log)["ok"] else 1
    t0 = time.time()
    rows = run(args.d, args.f, args.rank, args.batches, args.sparsities, log)
    result = dict(command="PYTHONPATH=. python3 -m benchmarks.predictor_kernels " + " ".join(sys.argv[1:]),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  machine=platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"), d=args.d, f=args.f,
                  rank=args.rank, seconds=round(time.time() - t0, 1), rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
