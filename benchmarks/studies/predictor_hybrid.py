"""Hybrid of a learned predictor and CATS: does it read fewer MLP weight bytes than CATS alone?

Per gated MLP, ``down(act(gate x) * up x)``:

1. the low-rank predictor (``actsparse.calibration.predictor``) selects a superset S of the
   neurons: the top ``round(p n)`` of its logits per token;
2. the gate projection is computed for the rows in S only;
3. the CATS rule ``|act(gate x)| > t`` (t calibrated per layer as ``Calibrator.plan("cats", c)``
   does) is applied inside S;
4. up and down are read only for the neurons kept (S and the CATS rule).

MLP weight bytes per token, as a ratio to the dense MLP (gate, up and down each 1/3):
``p / 3 + 2 / 3 * kept + predictor bytes`` (counted by ``benchmarks.predictor.mlp_bytes_per_token``,
from the gate and up/down fractions measured on the perplexity text). Endpoints: ``p = 1``
(plain CATS at c, no predictor) and the predictor alone (no CATS rule, ``c = 0``).

Same protocol as ``benchmarks.predictor`` (WikiText-2 test articles 0-9 train and
calibrate, articles 10+ evaluate, CPU fp32); the masked MLPs run eagerly (the MLP modules'
forward replaced, for the duration of a row, by the repository's reference semantics
``predicted_mlp_reference`` with the combined mask).

Target: at the perplexity of plain CATS at 50%, does a hybrid read at least 25% fewer MLP
weight bytes per token (log-linear interpolation along the Pareto frontier of all rows)?

    python benchmarks/studies/predictor_hybrid.py --data DIR --out benchmarks/results/predictor_hybrid_smollm2-135m.json
    python benchmarks/studies/predictor_hybrid.py --data DIR --quick          # smoke run, under 2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from actsparse import models
from benchmarks.harness import log as _log, write_json as _write_json
from benchmarks.predictor import _interp, mlp_bytes_per_token
from actsparse.calibration import Calibrator, wikitext2_split
from actsparse.calibration.predictor import PredictorConfig, PredictorTrainer, _keep_count, gated_mlps
from actsparse.calibration.sites import trace_sites
from actsparse.eval import perplexity
from actsparse.ops.reference import predicted_mlp_reference, select
from actsparse.ops.reference import activation, input_mask

P_GRID = (0.6, 0.75, 0.85, 0.95)
C_GRID = (0.3, 0.4, 0.5)


# ---------------------------------------------------------------------------------- masking


class Counts:
    """Per MLP: tokens, and the summed per-token fractions of gate rows read (S), neurons kept
    (S and the CATS rule) and neurons the CATS rule alone would keep (over all n)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, key: str, sel: torch.Tensor, rule: torch.Tensor, kept: torch.Tensor) -> None:
        acc = self.sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])
        acc[0] += sel.shape[0]
        acc[1] += float(sel.float().mean(-1).sum())
        acc[2] += float(kept.float().mean(-1).sum())
        acc[3] += float(rule.float().mean(-1).sum())

    def fractions(self, key: str) -> tuple[float, float, float]:
        t, g, k, c = self.sums[key]
        return g / t, k / t, c / t


@contextlib.contextmanager
def hybrid_mlps(model, mlps, fitted: dict | None, p: float, thresholds: dict[str, float] | None, counts: Counts):
    """Every gated MLP of ``model`` runs ``down(where(S & |act(gate x)| > t, act(gate x) * up x, 0))``.

    S: the top ``round(p n)`` predictor logits per token (every neuron when ``fitted`` is None);
    the CATS rule is left out when ``thresholds`` is None (predictor alone).
    """
    mods = dict(model.named_modules())
    patched = []

    def make(s):
        gate, up, down = mods[s.gate], mods[s.up], mods[s.module]
        n = s.in_features
        f = None if fitted is None else fitted[s.module]
        keep = _keep_count(1.0 - p, n)
        t = None if thresholds is None else float(thresholds[s.module])

        def forward(x, *rest, **kw):
            x2 = x.reshape(-1, x.shape[-1]).float()
            g = activation(s.act, F.linear(x2, gate.weight.float(), None if gate.bias is None else gate.bias.float()))
            sel = torch.ones_like(g, dtype=torch.bool) if f is None else select(f.logits(x2), keep, 0.0, True)
            rule = torch.ones_like(sel) if t is None else input_mask(g, t, False)
            kept = sel & rule
            counts.add(s.module, sel, rule, kept)
            return predicted_mlp_reference(x, kept.reshape(*x.shape[:-1], n), gate.weight, up.weight, down.weight,
                                           gate.bias, up.bias, down.bias, s.act)
        return forward

    try:
        for s in mlps:
            mlp = mods[s.module.rsplit(".", 1)[0]]
            if "forward" in vars(mlp):
                raise RuntimeError(f"{s.module}: the MLP module already has an instance forward")
            mlp.forward = make(s)
            patched.append(mlp)
        yield model
    finally:
        for mlp in patched:
            del mlp.forward


# ---------------------------------------------------------------------------------- frontier


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """(bytes, ppl, label) points no other point beats in both; sorted by bytes (ppl falls)."""
    out = []
    for b, ppl, label in sorted(points):
        if not out or ppl < out[-1][1]:
            out.append((b, ppl, label))
    return out


def target_check(rows: list[dict], cats_c: float = 0.5, reduction: float = 0.25) -> dict | None:
    cats = next((r for r in rows if r["kind"] == "cats" and abs(r["c"] - cats_c) < 1e-9), None)
    pts = [(r["bytes_ratio"], r["ppl"], r["label"]) for r in rows if r["kind"] != "dense"]
    if cats is None or not pts:
        return None
    front = pareto(pts)
    cats_b, cats_ppl = cats["bytes_ratio"], cats["ppl"]
    b = _interp([(x, y) for x, y, _ in front], cats_ppl)
    note = None
    if b is None:
        lowest = front[0]
        if lowest[1] <= cats_ppl:
            b = lowest[0]
            note = (f"the lowest-bytes frontier row ({lowest[2]}) already has a lower perplexity; the bytes are "
                    "an upper bound")
        else:
            note = "no row reaches the perplexity of cats at this target"
    hyb = [(r["bytes_ratio"], r["ppl"], r["label"]) for r in rows if r["kind"] == "hybrid"]
    best_h = min(hyb, key=lambda x: x[1]) if hyb else None
    res = {"cats_c": cats_c, "cats_ppl": cats_ppl, "cats_bytes_ratio": cats_b,
           "required_bytes_ratio": round((1 - reduction) * cats_b, 5),
           "frontier": [{"label": lab, "bytes_ratio": x, "ppl": round(y, 3)} for x, y, lab in front],
           "frontier_bytes_at_cats_ppl": None if b is None else round(b, 5),
           "reduction_vs_cats": None if b is None else round(1 - b / cats_b, 4),
           "frontier_rows_below_cats_bytes": [lab for x, y, lab in front if x < cats_b and y <= cats_ppl],
           "hybrid_rows_at_or_below_cats_ppl": [lab for x, y, lab in hyb if y <= cats_ppl],
           "best_hybrid_ppl": None if best_h is None else {"label": best_h[2], "ppl": round(best_h[1], 3),
                                                           "bytes_ratio": best_h[0]},
           "hybrid_nearest_cats_bytes": None if not hyb else dict(zip(
               ("bytes_ratio", "ppl", "label"), min(hyb, key=lambda x: abs(x[0] - cats_b)))),
           "met": bool(b is not None and 1 - b / cats_b >= reduction)}
    if note:
        res["note"] = note
    return res


# ---------------------------------------------------------------------------------- run


def grid(args) -> list[tuple[str, float, float]]:
    """(kind, p, c) in evaluation order: dense, cats (p = 1), predictor alone (c = 0), hybrids."""
    order = [("dense", 1.0, 0.0)] if not args.no_dense else []
    order += [("cats", 1.0, c) for c in sorted(args.c, reverse=True)]
    order += [("predictor", p, 0.0) for p in sorted(args.p, reverse=True)]
    order += [("hybrid", p, c) for p in sorted(args.p, reverse=True) for c in sorted(args.c)]
    return order


def label_of(kind: str, p: float, c: float) -> str:
    return {"dense": "dense", "cats": f"cats c={c:g}", "predictor": f"predictor p={p:g}"}.get(
        kind, f"hybrid p={p:g} c={c:g}")


def run(args) -> dict:
    t_start = time.perf_counter()
    out = Path(args.out)
    data = json.loads(out.read_text()) if args.resume and out.exists() else {}
    rows = data.get("rows", [])
    done = {r["label"] for r in rows}
    model, tok = models.load(args.model)
    cal_text, eval_text, split = wikitext2_split(args.data, args.calibration_articles)
    sites = trace_sites(model)
    mlps = gated_mlps(sites)
    data.update({"config": config(args, split), "model": args.model, "rows": rows})
    data.setdefault("seconds", {})
    todo = [g for g in grid(args) if label_of(*g) not in done][: args.limit]
    _log(f"{args.model}: {len(mlps)} gated MLPs, {len(todo)} rows to evaluate")

    lazy: dict = {}

    def thresholds(c: float) -> dict[str, float]:
        if "cal" not in lazy:
            t0 = time.perf_counter()
            lazy["cal"] = Calibrator(model, cal_text, tok, methods=("cats",), token_budget=args.calib_tokens,
                                     batch_size=args.batch_size, seq_len=args.window, seed=args.seed,
                                     progress=False, source=split["source"])
            data["seconds"]["cats_statistics"] = round(time.perf_counter() - t0, 1)
            _log(f"CATS statistics: {data['seconds']['cats_statistics']} s")
        plan = lazy["cal"].plan("cats", c)
        return dict(plan.activation_thresholds)

    def predictor(p: float):
        """(fitted predictors, their plan at sparsity 1 - p): trained once, labels at --label-sparsity."""
        if "trainer" not in lazy:
            cfg = PredictorConfig(rank=args.rank, label="topk", selection="topk", epochs=args.epochs, lr=args.lr,
                                  seed=args.seed)
            t0 = time.perf_counter()
            tr = lazy["trainer"] = PredictorTrainer(model, cal_text, tok, config=cfg, token_budget=args.train_tokens,
                                                    batch_size=args.batch_size, seq_len=args.window,
                                                    progress=False, source=split["source"])
            data["seconds"]["predictor_inputs"] = round(time.perf_counter() - t0, 1)
            _log(f"predictor inputs: {data['seconds']['predictor_inputs']} s; training ...")
            t0 = time.perf_counter()
            tr.fit(args.label_sparsity)
            data["seconds"]["predictor_training"] = round(time.perf_counter() - t0, 1)
            _log(f"predictor training: {data['seconds']['predictor_training']} s")
            data["predictor_config"] = {**vars(cfg), "label_sparsity": args.label_sparsity, "train_tokens": tr.split,
                                        "held_out_tokens": len(next(iter(tr.inputs.values()))) - tr.split}
        tr = lazy["trainer"]
        key = round(p, 6)
        if key not in lazy.setdefault("plans", {}):
            lazy["plans"][key] = tr.plan(1.0 - p, args.label_sparsity) if p < 1 else None
        return tr.fit(args.label_sparsity), lazy["plans"][key]

    for i, (kind, p, c) in enumerate(todo):
        label = label_of(kind, p, c)
        t0 = time.perf_counter()
        _log(f"[{i + 1}/{len(todo)}] {label} ...")
        fitted, plan = predictor(p) if kind in ("predictor", "hybrid") else (None, None)
        ths = thresholds(c) if kind in ("cats", "hybrid") else None
        counts = Counts()
        t_eval = time.perf_counter()
        if kind == "dense":
            r = perplexity(model, tok, text=eval_text, window=args.window, max_tokens=args.eval_tokens,
                           batch_size=args.batch_size, progress=False)
        else:
            with torch.no_grad(), hybrid_mlps(model, mlps, fitted, p, ths, counts):
                r = perplexity(model, tok, text=eval_text, window=args.window, max_tokens=args.eval_tokens,
                               batch_size=args.batch_size, progress=False)
        row = {"label": label, "kind": kind, "p": p if kind in ("predictor", "hybrid") else 1.0,
               "c": c if kind in ("cats", "hybrid") else 0.0, "ppl": r.ppl, "nll": r.nll, "ppl_tokens": r.tokens,
               "ppl_seconds": round(time.perf_counter() - t_eval, 1)}
        if kind == "dense":
            row.update({"gate_fraction": 1.0, "kept_fraction": 1.0, "bytes_ratio": 1.0})
        else:
            fr = {s.module: counts.fractions(s.module) for s in mlps}
            sparsity = {}
            for s in mlps:
                g, k, _ = fr[s.module]
                sparsity.update({s.gate: 1.0 - g, s.up: 1.0 - k, s.module: 1.0 - k})
            mb = mlp_bytes_per_token(sites, plan, sparsity)
            nl = len(mlps)
            row.update({
                "gate_fraction": round(sum(v[0] for v in fr.values()) / nl, 5),
                "kept_fraction": round(sum(v[1] for v in fr.values()) / nl, 5),
                "cats_rule_fraction": round(sum(v[2] for v in fr.values()) / nl, 5) if ths else None,
                "bytes_ratio": mb["ratio"], "mlp_bytes": mb,
                "layers": {k: {"gate": round(v[0], 5), "kept": round(v[1], 5), "cats_rule": round(v[2], 5)}
                           for k, v in fr.items()},
            })
            if ths:  # the share of the neurons CATS alone keeps that S contains
                row["cats_recall_of_S"] = round(row["kept_fraction"] / max(1e-12, row["cats_rule_fraction"]), 5)
            if plan is not None:
                info = plan.info["predictor"]
                row["predictor"] = {"rank": next(iter(plan.predictors.values()))["rank"],
                                    "heldout_recall_vs_topk_labels": info["mean_recall"],
                                    "heldout_mass_recall": info["mean_mass_recall"]}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        _write_json(out, data)
        left = len(todo) - i - 1
        _log(f"    ppl {row['ppl']:.2f}, gate {row['gate_fraction']:.3f}, kept {row['kept_fraction']:.3f}, "
             f"bytes {row['bytes_ratio']:.3f} of dense, {row['seconds']} s ({left} left)")

    data["target_check"] = target_check(rows, args.cats_target)
    data["seconds"]["wall_this_run"] = round(time.perf_counter() - t_start, 1)
    _write_json(out, data)
    out.with_suffix(".md").write_text(markdown(data))
    _log(f"wrote {out} and {out.with_suffix('.md')}; wall {data['seconds']['wall_this_run']} s")
    return data


def config(args, split: dict) -> dict:
    return {
        "command": "python benchmarks/studies/predictor_hybrid.py " + " ".join(sys.argv[1:]),
        "calibration_text": split["calibration"], "evaluation_text": split["evaluation"],
        "predictor_train_tokens": args.train_tokens, "cats_calibration_tokens": args.calib_tokens,
        "eval_tokens": args.eval_tokens, "window": args.window, "batch_size": args.batch_size,
        "p_grid": list(args.p), "c_grid": list(args.c), "rank": args.rank, "epochs": args.epochs,
        "label": "topk", "label_sparsity": args.label_sparsity, "selection": "topk", "seed": args.seed,
        "quick": args.quick, "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "masking": "eager: each MLP module's forward is predicted_mlp_reference with mask S & (|act(gate x)| > t)",
        "bytes": "MLP weight bytes read per token at batch 1 / dense MLP: gate rows in S (p/3), up and down for "
                 "the kept neurons (2/3 kept), predictor weights (W1, W2, b2) in full; fractions measured on "
                 "the perplexity text",
    }


def markdown(data: dict) -> str:
    cfg, rows = data["config"], data["rows"]
    pc = data.get("predictor_config", {})
    chk = data.get("target_check")
    rank = next((r["predictor"]["rank"] for r in rows if r.get("predictor")), "?")
    lines = ["# Predictor + CATS hybrid (CPU, fp32)", "",
             f"Command: `{cfg['command']}`", "",
             f"Model {data['model']}. Per gated MLP the predictor (rank {rank}, {cfg['rank']} of d; labels "
             f"`topk` at sparsity {cfg['label_sparsity']}; epochs {cfg['epochs']}; {pc.get('train_tokens')} "
             f"training tokens of {cfg['calibration_text']}) keeps the top p of the neurons per token (S); the "
             f"gate is computed on S; the CATS rule |act(gate x)| > t (t per layer at CATS target c, calibrated "
             f"on {cfg['cats_calibration_tokens']} tokens of the same articles) is applied inside S; up and down "
             f"read the kept neurons. Perplexity: {cfg['evaluation_text']}, first {cfg['eval_tokens']} tokens in "
             f"windows of {cfg['window']}. Bytes: {cfg['bytes']}. `cats` rows: p = 1 (no predictor, no "
             "predictor bytes); `predictor` rows: no CATS rule.", "",
             "| method | p | c | ppl | gate fraction | kept fraction (up/down) | MLP bytes / dense |",
             "|---|---|---|---|---|---|---|"]
    order = {"dense": 0, "cats": 1, "predictor": 2, "hybrid": 3}
    for r in sorted(rows, key=lambda r: (order[r["kind"]], -r["p"], r["c"])):
        c = "" if r["kind"] in ("dense", "predictor") else f"{r['c']:.2f}"
        p = "" if r["kind"] in ("dense", "cats") else f"{r['p']:.2f}"
        lines.append(f"| {r['kind']} | {p} | {c} | {r['ppl']:.2f} | {r['gate_fraction']:.3f} | "
                     f"{r['kept_fraction']:.3f} | {r['bytes_ratio']:.3f} |")
    if chk:
        front = ", ".join(f"{f['label']} ({f['bytes_ratio']:.3f}, {f['ppl']:.2f})" for f in chk["frontier"])
        b = chk["frontier_bytes_at_cats_ppl"]
        lines += ["", f"Pareto frontier (bytes, ppl): {front}.", "",
                  f"Target: at the perplexity of cats at {chk['cats_c']:.0%} ({chk['cats_ppl']:.2f}, "
                  f"{chk['cats_bytes_ratio']:.3f} of the dense MLP bytes; 25% fewer is "
                  f"{chk['required_bytes_ratio']:.3f}) the Pareto frontier of all rows reads "
                  + ("(not reached)" if b is None else f"{b:.3f}")
                  + ("" if chk["reduction_vs_cats"] is None else f", {chk['reduction_vs_cats']:.1%} fewer")
                  + f" (target >= 25% fewer: {'met' if chk['met'] else 'not met'})."
                  + (f" {chk['note'][0].upper()}{chk['note'][1:]}." if chk.get("note") else "")]
        hb = chk.get("best_hybrid_ppl")
        below = chk["hybrid_rows_at_or_below_cats_ppl"]
        lines += ["", ("Hybrid rows at or below that perplexity: " + ", ".join(below) + "." if below
                       else "No hybrid row reaches that perplexity.")
                  + (f" The lowest hybrid perplexity is {hb['ppl']:.2f} ({hb['label']}, "
                     f"{hb['bytes_ratio']:.3f} of the dense bytes)." if hb else "")]
        near = chk.get("hybrid_nearest_cats_bytes")
        if near:
            lines += ["", f"At about the bytes of cats at {chk['cats_c']:.0%}: {near['label']} reads "
                      f"{near['bytes_ratio']:.3f} of the dense bytes at perplexity {near['ppl']:.2f} (cats: "
                      f"{chk['cats_bytes_ratio']:.3f}, {chk['cats_ppl']:.2f})."]
    secs = data.get("seconds", {})
    if secs:
        lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in secs.items()) + "."]
    lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--model", default="smollm2-135m")
    add("--data", default=None, metavar="DIR")
    add("--p", nargs="+", type=float, default=list(P_GRID), help="predictor keep fractions (S)")
    add("--c", nargs="+", type=float, default=list(C_GRID), help="CATS target sparsities")
    add("--cats-target", type=float, default=0.5, help="the cats row whose perplexity the target check uses")
    add("--eval-tokens", type=int, default=4096)
    add("--calib-tokens", type=int, default=4096, help="CATS calibration tokens")
    add("--train-tokens", type=int, default=16384, help="predictor training tokens (incl. held-out)")
    add("--calibration-articles", type=int, default=10)
    add("--window", type=int, default=512)
    add("--batch-size", type=int, default=4)
    add("--rank", type=float, default=0.08)
    add("--epochs", type=int, default=8)
    add("--label-sparsity", type=float, default=0.5)
    add("--lr", type=float, default=3e-3)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1)
    add("--no-dense", action="store_true", help="skip the dense row")
    add("--limit", type=int, default=None, help="evaluate at most this many rows (in grid order)")
    add("--quick", action="store_true",
        help="smoke run: 1024 eval / 1024 calibration / 2048 training tokens, 1 epoch, p 0.75, c 0.5; "
             "writes to the temp directory unless --out is given")
    add("--resume", action="store_true", help="keep the rows of an existing --out and evaluate the rest")
    add("--out", default=None)
    add("--report", action="store_true", help="only rewrite the markdown (and target check) of an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.eval_tokens, args.calib_tokens, args.train_tokens, args.epochs = 1024, 1024, 2048, 1
        args.p, args.c = [0.75], [0.5]
    if args.out is None:
        args.out = (str(Path(tempfile.gettempdir()) / "predictor_hybrid_quick.json") if args.quick
                    else f"benchmarks/predictor_hybrid_{args.model}.json")
    if args.cats_target not in args.c:
        args.c = sorted(set(args.c) | {args.cats_target})
    if args.report:
        out = Path(args.out)
        data = json.loads(out.read_text())
        data["target_check"] = target_check(data["rows"], args.cats_target)
        _write_json(out, data)
        out.with_suffix(".md").write_text(markdown(data))
        return 0
    torch.set_num_threads(args.threads)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
