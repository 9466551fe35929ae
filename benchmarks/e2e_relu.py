"""End-to-end GPU decode of relufied models: ReLU MLPs under their exact plan, one run.

Random-weight Llama-3 shapes in bf16: decode speed depends on the shapes and on how many MLP
neurons are zero, not on what the weights learned. ``--mlp-sparsity`` sets that fraction with
shifted ReLU (a shift per MLP calibrated on random tokens), standing in for a fine-tuned relufied
model at that sparsity; ``0`` means plain ReLU (about half the neurons of a random model). Per
sparsity, the relufied model compiled dense (Inductor) and under its exact plan (the backend's
gated-MLP kernel at threshold 0: gate read in full, up and down only for the neurons that fire).
The original SiLU model compiled dense is the baseline (``vs_dense``); ``vs_relu_dense`` compares
with the same relufied model run dense. Every row has ``limit_tok_s``, the weight-bandwidth
limit at its measured MLP sparsity.

First a correctness check per sparsity on a small fp32 model of the same widths: the compiled
exact plan against the eager relufied model (the rule is exact: they must agree).

    python -m benchmarks.e2e_relu --mlp-sparsity 0.85 0 --out benchmarks/results/e2e_relu_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def relufied(name: str, sparsity: float, calib: torch.Tensor, dtype: torch.dtype, layers: int | None = None,
             device: str = "cuda"):
    """A fresh random model of shape ``name`` relufied to ``sparsity`` (0: plain ReLU), with its plan."""
    import actsparse
    from actsparse.models import shaped

    model = shaped(name, dtype=dtype, device=device, num_layers=layers)
    if sparsity > 0:
        return actsparse.relufy(model, "shifted-relu", tokens=calib, sparsity=sparsity)
    return actsparse.relufy(model, "relu", tokens=calib)


def mlp_bytes_saved(model, plan) -> float:
    """Weight bytes a batch-1 step skips: each MLP's up and down rows of the neurons that are
    zero (its measured sparsity); the gate is read in full."""
    saved = 0.0
    for down, s in plan.measured.items():
        mlp = model.get_submodule(down.rsplit(".", 1)[0])
        for lin in (mlp.up_proj, mlp.down_proj):
            saved += float(s) * lin.weight.numel() * lin.weight.element_size()
    return saved


def check_exact(sparsity: float, steps: int = 5, device: str = "cuda") -> dict:
    """Compiled exact plan (CUDA graphs) against the eager relufied model, fp32, 2 layers."""
    import actsparse
    from transformers import StaticCache

    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, 128000, (1, 32), device=device, generator=g)
    model, plan = relufied("llama3-tiny", sparsity, ids, torch.float32, device=device)

    def run(fwd):
        cache = StaticCache(config=model.config, max_cache_len=48)
        outs = []
        with torch.no_grad():
            model(input_ids=ids[:, :16], past_key_values=cache, cache_position=torch.arange(16, device=device))
            for i in range(steps):
                out = fwd(input_ids=ids[:, 16 + i:17 + i].contiguous(), past_key_values=cache,
                          cache_position=torch.tensor([16 + i], device=device))
                outs.append(out.logits.float().clone())
        return outs

    ref = run(model.forward)
    actsparse.prepare(model, plan)
    torch._dynamo.reset()
    got = run(torch.compile(model.forward, backend=actsparse.backend(plan, cudagraphs=device == "cuda"),
                            fullgraph=True))
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
    del model
    _free(device)
    return {"mlp_sparsity_target": sparsity, "measured": sum(plan.measured.values()) / len(plan.measured),
            "max_rel_err_vs_eager": rel, "ok": rel < 1e-3}


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--mlp-sparsity", type=float, nargs="+", default=[0.85, 0.0],
                   help="MLP sparsity of the shifted-ReLU stand-in (0: plain ReLU)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=480, help="start no new row after this many seconds")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (no bandwidth limit)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    for s in args.mlp_sparsity:
        if not 0.0 <= s < 1.0:
            p.error(f"--mlp-sparsity values must be in [0, 1), got {s}")
    t_start = time.time()

    import actsparse
    from actsparse.models import shaped
    from benchmarks.decode import weight_bytes
    from benchmarks.e2e import _dense_backend, lean_decode_rate
    from benchmarks.weight_limit import gemv_bandwidth, limit_tok_s

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    where = {"gpu": torch.cuda.get_device_name()} if args.device == "cuda" else {"cpu": "cpu (smoke run)"}
    res = {"command": "python -m benchmarks.e2e_relu " + " ".join(argv if argv is not None else sys.argv[1:]),
           **where, "torch": torch.__version__, "model": args.model,
           "dtype": "bfloat16", "batch": 1, "new_tokens": args.new_tokens, "loop": "lean",
           "weights": "random N(0, 1/fan_in); shifted ReLU calibrated on 512 random tokens stands in for a "
                      "fine-tuned relufied model at that MLP sparsity", "rows": []}

    def save():
        out.write_text(json.dumps(res, indent=1))

    if args.check:
        res["checks"] = [check_exact(s, device=args.device) for s in args.mlp_sparsity]
        print("checks:", res["checks"], flush=True)
        save()
    res["gemv_bandwidth_Bps"] = gemv_bw = gemv_bandwidth() if args.device == "cuda" else None
    g = torch.Generator(device=args.device).manual_seed(0)
    calib = torch.randint(0, 128000, (1, 512), device=args.device, generator=g)
    ids = torch.randint(0, 128000, (1, 32), device=args.device, generator=g)

    def add(name, model, backend, dense_bytes, saved, sparsity, extra=None):
        t0 = time.time()
        torch._dynamo.reset()
        tok_s = lean_decode_rate(model, backend, ids, args.new_tokens, args.repeats)
        row = {"variant": name, "batch": 1, "sparsity": sparsity, "tok_s": tok_s,
               "weight_bytes_per_token": dense_bytes - saved,
               "limit_tok_s": limit_tok_s(dense_bytes - saved, gemv_bw) if gemv_bw else None,
               "seconds": time.time() - t0}
        row["frac_of_limit"] = tok_s / row["limit_tok_s"] if gemv_bw else None
        base = res["rows"][0]["tok_s"] if res["rows"] else tok_s
        row["vs_dense"] = tok_s / base
        row.update(extra or {})
        res["rows"].append(row)
        save()
        lim = f"limit {row['limit_tok_s']:.0f} ({row['frac_of_limit']:.2f} of it)" if gemv_bw else ""
        print(f"{name:>24}: {tok_s:8.1f} tok/s  x{row['vs_dense']:.2f}  {lim}  ({row['seconds']:.0f}s)", flush=True)
        return row

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = shaped(args.model, dtype=dtype, device=args.device, num_layers=args.layers)
    res["weight_bytes"] = wb = weight_bytes(model)
    add("dense", model, _dense_backend(), wb, 0.0, 0.0)
    del model
    _free(args.device)
    for s in args.mlp_sparsity:
        if time.time() - t_start > args.budget_s:
            res.setdefault("skipped", []).append(f"mlp sparsity {s}: out of time")
            continue
        model, plan = relufied(args.model, s, calib, dtype, args.layers, args.device)
        measured = sum(plan.measured.values()) / len(plan.measured)
        label = f"{'shifted-relu' if s > 0 else 'relu'} {measured:.0%}"
        extra = {"mlp_sparsity": measured, "mlp_sparsity_target": s or None}
        wb_relu = weight_bytes(model)  # shifted ReLU adds the gate biases
        dense_row = add(f"{label} dense", model, _dense_backend(), wb_relu, 0.0, measured, extra)
        actsparse.prepare(model, plan)
        row = add(f"{label} exact", model, actsparse.backend(plan, cudagraphs=args.device == "cuda"), wb_relu,
                  mlp_bytes_saved(model, plan), measured, extra)
        row["vs_relu_dense"] = row["tok_s"] / dense_row["tok_s"]
        save()
        del model, plan
        _free(args.device)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
