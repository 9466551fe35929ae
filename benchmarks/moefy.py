"""Dense-to-MoE conversion of a real model: perplexity, MLP bytes and expert overlap at a few
densities, for the original and the relufied model, beside CATS at equal MLP bytes.

    OMP_NUM_THREADS=2 python -m benchmarks.moefy --experts 128 --densities 0.667 0.5 0.3 --oracle \\
        --adapters .cache/adapters/relufy_smollm2-135m.adapters.safetensors \\
        --out benchmarks/results/moefy_smollm2-135m.json

Protocol as benchmarks/accuracy.py and benchmarks/relufy.py: perplexity on WikiText-2 test
articles 10+ (the first ``--eval-tokens`` tokens, windows of 512); the conversion (clustering,
routers, thresholds) sees only the calibration articles 0-9. The experts run as
``actsparse.train.moefy.routed`` runs them (the reference the compiled backend equals).
``density`` is the fraction of experts run, measured on the evaluation text; the MLP weight
bytes per token are that fraction of gate + up + down plus the router's weights. CATS reads
the gate in full and ``1 - s`` of up and down, so CATS at activation sparsity s costs
``(1 + 2 (1 - s)) / 3``: density 0.667 is equal bytes with CATS at 50% (the figures in
``accuracy_smollm2-135m.json``, same protocol; ``--cats`` calibrates CATS again here at the
sparsities that match the other densities). Overlap: greedy decoding, batch 1, the fraction of
a step's experts that also ran at the previous step (as ``benchmarks/overlap.py`` measures
neurons), per MLP, averaged.

``--finetune router lora both`` fine-tunes the converted model with
``actsparse.train.moe_finetune`` (self-distillation KL to the dense model on sequences it
samples, routed forward in the loop) at the first density, then evaluates each recipe at every
density (thresholds recalibrated on the calibration articles), beside the same conversion
before fine-tuning (its own thresholds, and recalibrated layer after layer as the recipes are):

    OMP_NUM_THREADS=2 python -m benchmarks.moefy --experts 128 --densities 0.667 0.639 \\
        --plan .cache/moefy/smollm2-135m-e128-d0.667.plan.json --finetune router lora both \\
        --ft-steps 120 --ft-max-minutes 10 --ft-sequences .cache/moefy/smollm2-135m-seqs-256x128.safetensors \\
        --decode-steps 0 --out benchmarks/results/moefy_finetune_smollm2-135m.json

Density 0.639 is where the MLP bytes, router included (0.028 of the MLP at 128 experts),
equal CATS at 50% (0.667).

``--plan`` reuses a conversion saved by an earlier run with the same arguments (made and saved
there when the file is missing), since clustering costs minutes; ``--ft-sequences`` caches the teacher's sampled sequences (safetensors).
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
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.harness import command_line, log, write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--densities", type=float, nargs="+", default=[0.667, 0.5, 0.3])
    p.add_argument("--features", default="coact", choices=["coact", "down"])
    p.add_argument("--router", default="linear", choices=["linear", "mlp"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=64, help="greedy steps for the overlap (0: skip)")
    p.add_argument("--adapters", default=None, help="also convert the relufied model rebuilt from these adapters")
    p.add_argument("--no-original", action="store_true", help="skip the original (SiLU) model")
    p.add_argument("--oracle", action="store_true", help="also the oracle top-k experts (true norms) per density")
    p.add_argument("--cats", action="store_true", help="calibrate CATS here at the equal-bytes sparsities")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="evaluation data directory (default: $ACTSPARSE_DATA)")
    p.add_argument("--out", default="benchmarks/results/moefy_smollm2-135m.json")
    p.add_argument("--plan", default=None, help="a saved conversion plan to use instead of converting again")
    p.add_argument("--save-plan", default=None, help="save the conversion plan here (JSON + safetensors)")
    p.add_argument("--finetune", nargs="+", default=[], choices=["router", "lora", "both"],
                   help="fine-tune recipes to measure (actsparse.train.moe_finetune)")
    p.add_argument("--ft-steps", type=int, default=120)
    p.add_argument("--ft-batch", type=int, default=4)
    p.add_argument("--ft-seq-len", type=int, default=128)
    p.add_argument("--ft-samples", type=int, default=256, help="training sequences sampled from the dense model")
    p.add_argument("--ft-held-out", type=int, default=16, help="further sampled sequences for the held-out KL")
    p.add_argument("--ft-router-lr", type=float, default=3e-3)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-rank", type=int, default=8)
    p.add_argument("--ft-tau", type=float, default=0.25)
    p.add_argument("--ft-max-minutes", type=float, default=10.0, help="training time cap per recipe")
    p.add_argument("--ft-sequences", default=None, help="cache file (safetensors) of the sampled sequences")
    p.add_argument("--ft-save", default=None, help="directory to save each recipe's plan and adapters in")
    return p.parse_args(argv)


def router_bytes_fraction(plan) -> float:
    """Router weights over MLP weights (both in the model's dtype)."""
    from actsparse.plan.rules.experts import Experts

    rule = plan.rule(Experts)
    r = sum(sum(t.numel() for t in rule.router(n)) for n in rule.specs)
    m = sum(3 * s["in_features"] * s["neurons"] for s in rule.specs.values())
    return r / m


def perplexity(model, tok, text, args) -> tuple[float, int, float]:
    from actsparse.eval import perplexity as ppl

    t0 = time.perf_counter()
    r = ppl(model, tok, text=text, window=args.window, max_tokens=args.eval_tokens, batch_size=2, progress=False)
    return r.ppl, r.tokens, time.perf_counter() - t0


def expert_overlap(model, plan, ids: torch.Tensor, steps: int) -> float | None:
    """Mean over MLPs and steps of |E_t & E_{t-1}| / |E_t| under greedy decoding, batch 1."""
    from transformers import StaticCache

    from actsparse.train.moefy import routed
    from benchmarks.overlap import overlaps

    if steps < 2:
        return None
    masks: dict[str, list[torch.Tensor]] = {}
    n = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 2)
    with torch.no_grad(), routed(model, plan, record=masks):
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n))
        for v in masks.values():
            v.clear()  # prefill excluded
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            out = model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([n + i]))
            tok = out.logits[:, -1:].argmax(-1)
    per_mlp = [statistics.mean(overlaps([m[-1] for m in seq])) for seq in masks.values()]
    return statistics.mean(per_mlp)


def moe_rows(base, label: str, tok, calib: str, text: str, prompt: torch.Tensor, args) -> list[dict]:
    """Convert ``base`` once (clustering and routers do not depend on the density), then evaluate
    each density with its recalibrated thresholds (``retarget``)."""
    import actsparse
    from actsparse.train.moefy import MoefyReport, retarget, routed

    rep = MoefyReport()
    t0 = time.perf_counter()
    model, plan0 = actsparse.moefy(copy.deepcopy(base), experts=args.experts, density=args.densities[0],
                                   calibration=calib, tokenizer=tok, features=args.features, router=args.router,
                                   hidden=args.hidden, token_budget=args.calib_tokens, seed=args.seed, report=rep)
    convert_s = time.perf_counter() - t0
    rows = []
    for d in args.densities:
        plan = retarget(plan0, rep, d)
        masks: dict[str, list[torch.Tensor]] = {}
        with routed(model, plan, record=masks):
            p, ntok, ev_s = perplexity(model, tok, text, args)
        per_layer = [float(torch.cat(v).float().mean()) for v in masks.values()]
        run = statistics.mean(per_layer)
        row = {"variant": f"{label} -> MoE", "experts": args.experts, "target_density": d,
               "density": round(run, 4), "density_min_layer": round(min(per_layer), 4),
               "density_max_layer": round(max(per_layer), 4),
               "mlp_bytes_fraction": round(run + router_bytes_fraction(plan), 4), "ppl": round(p, 3),
               "ppl_tokens": ntok, "overlap": None, "features": args.features, "router": args.router,
               "router_train_tokens": rep.tokens, "router_r2_mean": round(statistics.mean(rep.router_r2), 4),
               "router_r2_min": round(min(rep.router_r2), 4),
               "router_train_seconds": round(rep.seconds.get("routers", 0.0), 1),
               "clustering_seconds": round(rep.seconds.get("clustering", 0.0), 1),
               "activation_seconds": round(rep.seconds.get("activations", 0.0), 1),
               "convert_seconds": round(convert_s, 1), "eval_seconds": round(ev_s, 1)}
        if args.oracle:
            with oracle(model, plan, d):
                row["ppl_oracle_topk"] = round(perplexity(model, tok, text, args)[0], 3)
        if args.decode_steps:
            ov = expert_overlap(model, plan, prompt, args.decode_steps)
            row["overlap"] = None if ov is None else round(ov, 4)
            row["overlap_if_independent"] = round(run, 4)
        log(f"{row['variant']} d={d}: ppl {row['ppl']}, density {row['density']}, overlap {row['overlap']}"
            + (f", oracle {row['ppl_oracle_topk']}" if args.oracle else ""))
        rows.append(row)
    return rows


@contextmanager
def oracle(model, plan, density: float):
    """Each MLP runs each token's ``round(density * E)`` experts of largest true output norm:
    what a perfect router could do with these experts (a diagnosis, not a method: it computes
    every expert to rank them)."""
    from actsparse.ops.reference import expert_mlp_reference
    from actsparse.plan.rules.experts import Experts
    from actsparse.train.moefy import expert_norms

    rule = plan.rule(Experts)
    mods = []
    for name, sp in rule.specs.items():
        mod = model.get_submodule(name.rsplit(".", 1)[0])
        k = max(1, round(density * sp["experts"]))

        def forward(x, mod=mod, sp=sp, k=k):
            norms = expert_norms(mod, x.reshape(-1, x.shape[-1]).float(), sp["act"], sp["experts"])
            mask = (norms >= norms.topk(k, dim=-1).values[:, -1:]).reshape(*x.shape[:-1], -1)
            return expert_mlp_reference(x, mask, mod.gate_proj.weight, mod.up_proj.weight, mod.down_proj.weight,
                                        mod.gate_proj.bias, mod.up_proj.bias, mod.down_proj.bias, sp["act"])

        mod.forward = forward
        mods.append(mod)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def converted(base, tok, calib: str, args):
    """(moefied copy of ``base``, plan, conversion report or None): converted here, or the saved
    ``--plan`` applied to a copy (``permute``)."""
    import actsparse
    from actsparse.plan import SparsityPlan
    from actsparse.train.moefy import MoefyReport, permute

    if args.plan and Path(args.plan).is_file():
        plan = SparsityPlan.load(args.plan, base)
        return permute(copy.deepcopy(base), plan), plan, None
    rep = MoefyReport()
    model, plan = actsparse.moefy(copy.deepcopy(base), experts=args.experts, density=args.densities[0],
                                  calibration=calib, tokenizer=tok, features=args.features, router=args.router,
                                  hidden=args.hidden, token_budget=args.calib_tokens, seed=args.seed, report=rep)
    if args.save_plan or args.plan:  # a --plan not there yet is made here, for the next run
        plan.save(args.save_plan or args.plan)
    return model, plan, rep


def teacher_sequences(base, args) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(training, held-out) sequences sampled from the dense model, and the seconds it took
    (0 when read back from ``--ft-sequences``)."""
    from actsparse.train.sequences import cached_sequences

    return cached_sequences(base, args.ft_samples, args.ft_held_out, args.ft_seq_len, args.ft_sequences,
                            seed=args.seed)


def routed_row(model, plan, tok, text: str, args, variant: str, density: float) -> dict:
    """Perplexity with the plan's routing, the fraction of experts run on the evaluation text and
    the MLP bytes per token that makes."""
    from actsparse.train.moefy import routed

    masks: dict[str, list[torch.Tensor]] = {}
    with routed(model, plan, record=masks):
        p, ntok, ev_s = perplexity(model, tok, text, args)
    per_layer = [float(torch.cat(v).float().mean()) for v in masks.values()]
    run = statistics.mean(per_layer)
    row = {"variant": variant, "experts": args.experts, "target_density": density, "density": round(run, 4),
           "density_min_layer": round(min(per_layer), 4), "density_max_layer": round(max(per_layer), 4),
           "mlp_bytes_fraction": round(run + router_bytes_fraction(plan), 4), "ppl": round(p, 3),
           "ppl_tokens": ntok, "eval_seconds": round(ev_s, 1)}
    log(f"{variant} d={density}: ppl {row['ppl']}, density {row['density']}, bytes {row['mlp_bytes_fraction']}")
    return row


def finetune_rows(base, tok, calib: str, text: str, args, save) -> list[dict]:
    """The conversion before fine-tuning, then each ``--finetune`` recipe, at every density."""
    from actsparse.calibration.data import token_batches
    from actsparse.train.moe_finetune import MoeFinetuneConfig, finetune_moe, recalibrate, save_finetuned

    model, plan0, _ = converted(base, tok, calib, args)
    batches, _ = token_batches(calib, tok, token_budget=args.calib_tokens, batch_size=1,
                               seq_len=min(512, args.calib_tokens), seed=args.seed)
    calib_ids = torch.cat(batches)
    train, held, sample_s = teacher_sequences(base, args)
    d0 = args.densities[0]
    rows = [routed_row(model, plan0, tok, text, args, "original -> MoE, no fine-tune (moefy thresholds)",
                       float(plan0.info["density"]))]
    rows[-1]["recipe"] = "none"
    save(rows)
    for d in args.densities:
        rows.append(routed_row(model, recalibrate(model, plan0, calib_ids, d), tok, text, args,
                               "original -> MoE, no fine-tune (recalibrated)", d))
        rows[-1]["recipe"] = "none"
        save(rows)
    for recipe in args.finetune:
        cfg = MoeFinetuneConfig(train=recipe, steps=args.ft_steps, batch_size=args.ft_batch, seq_len=args.ft_seq_len,
                                samples=args.ft_samples, held_out=args.ft_held_out, density=d0,
                                router_lr=args.ft_router_lr, lr=args.ft_lr, rank=args.ft_rank, tau=args.ft_tau,
                                seed=args.seed, max_seconds=60.0 * args.ft_max_minutes)
        m = copy.deepcopy(model)
        plan, res = finetune_moe(m, plan0, base, cfg, sequences=train, held_out=held, calibration=calib_ids,
                                 progress=True)
        if args.ft_save:
            save_finetuned(m, plan, Path(args.ft_save) / f"{args.model}-e{args.experts}-{recipe}.plan.json")
        train_info = {"recipe": recipe, "train_tokens": res.tokens, "train_steps": res.steps,
                      "train_minutes": round(res.seconds / 60, 2), "sample_minutes": round(sample_s / 60, 2),
                      "recalibration_seconds": round(res.recalibration_seconds, 1),
                      "held_out_kl_before": round(res.held_out_kl_before, 4),
                      "held_out_kl_after": round(res.held_out_kl_after, 4),
                      "train_kl_first10": round(statistics.mean(res.kl[:10]), 4),
                      "train_kl_last10": round(statistics.mean(res.kl[-10:]), 4),
                      "trained_at_density": d0, "config": res.config}
        for d in args.densities:
            p = plan if d == d0 else recalibrate(m, plan, calib_ids, d)
            rows.append({**routed_row(m, p, tok, text, args, f"original -> MoE, fine-tuned ({recipe})", d),
                         **train_info})
            save(rows)
        del m
    return rows


def cats_rows(base, tok, calib: str, text: str, args) -> list[dict]:
    """CATS calibrated here at the activation sparsity whose MLP bytes equal each density's."""
    import actsparse

    rows = []
    for d in args.densities:
        s = round(1.0 - (3 * d - 1) / 2, 4)  # (1 + 2 (1 - s)) / 3 = d
        if not 0.0 < s < 1.0:
            continue
        plan = actsparse.calibrate(base, calib, "cats", s, tokenizer=tok, token_budget=args.calib_tokens, progress=False)
        fast = torch.compile(base, backend="sparse", options={"plan": plan})
        p, ntok, ev_s = perplexity(fast, tok, text, args)
        torch._dynamo.reset()
        rows.append({"variant": "CATS (training-free)", "activation_sparsity": s,
                     "mlp_bytes_fraction": round((1 + 2 * (1 - s)) / 3, 4), "ppl": round(p, 3), "ppl_tokens": ntok,
                     "eval_seconds": round(ev_s, 1)})
        log(f"CATS s={s}: ppl {p:.3f}")
    return rows


def reference_rows(model_name: str) -> list[dict]:
    """CATS and dense from the committed accuracy results (same protocol), where present."""
    path = Path(__file__).parent / "results" / f"accuracy_{model_name}.json"
    if not path.is_file():
        return []
    rows = []
    for r in json.loads(path.read_text()).get("rows", []):
        if r.get("method") == "cats" and r.get("target") is not None:
            s = float(r["target"])
            rows.append({"variant": "CATS (training-free)", "activation_sparsity": s,
                         "mlp_bytes_fraction": round((1 + 2 * (1 - s)) / 3, 4), "ppl": round(r["ppl"], 3),
                         "ppl_tokens": r.get("ppl_tokens"), "source": f"benchmarks/results/{path.name}"})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from actsparse import models
    from actsparse.calibration import wikitext2_split
    from actsparse.train import rebuild

    base, tok = models.load(args.model, dtype=torch.float32)
    base.eval()
    calib, text, split = wikitext2_split(args.data)
    prompt = tok(text[:4000], return_tensors="pt").input_ids[:, :64]
    out = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "command": command_line("benchmarks.moefy", argv), "model": args.model,
           "calibration_text": split["calibration"], "evaluation_text": split["evaluation"], "window": args.window,
           "loadavg": os.getloadavg(), "experts_fine_tuned": False, "rows": []}

    def save():
        write_json(args.out, out)

    p, ntok, ev_s = perplexity(base, tok, text, args)
    out["rows"].append({"variant": "dense", "density": 1.0, "mlp_bytes_fraction": 1.0, "ppl": round(p, 3),
                        "ppl_tokens": ntok, "eval_seconds": round(ev_s, 1)})
    out["rows"] += reference_rows(args.model)
    save()
    if args.finetune:
        out["experts_fine_tuned"] = any(r in ("lora", "both") for r in args.finetune)
        out["sequences"] = {"source": "sampled from the dense model (temperature 1, seeded)",
                            "train": args.ft_samples, "held_out": args.ft_held_out, "length": args.ft_seq_len}
        done = list(out["rows"])

        def save_ft(rows):
            out["rows"] = done + rows
            save()

        save_ft(finetune_rows(base, tok, calib, text, args, save_ft))
    elif not args.no_original:
        out["rows"] += moe_rows(base, "original", tok, calib, text, prompt, args)
        save()
    if args.cats:
        out["rows"] += cats_rows(base, tok, calib, text, args)
        save()
    if args.adapters:
        relu, _ = rebuild(copy.deepcopy(base), args.adapters)
        p, ntok, ev_s = perplexity(relu, tok, text, args)
        out["rows"].append({"variant": f"relufied ({Path(args.adapters).name})", "density": 1.0,
                            "mlp_bytes_fraction": 1.0, "ppl": round(p, 3), "ppl_tokens": ntok,
                            "eval_seconds": round(ev_s, 1)})
        out["adapters"] = Path(args.adapters).name
        out["rows"] += moe_rows(relu, "relufied", tok, calib, text, prompt, args)
        save()
    for r in out["rows"]:
        print(f"{r['variant']:>34} bytes {r['mlp_bytes_fraction']:.3f} ppl {r['ppl']:8.3f} "
              f"overlap {r.get('overlap')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
