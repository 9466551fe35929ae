"""Learned predictors against CATS: accuracy, per-layer recall/precision, MLP weight bytes per token.

    python -m benchmarks.predictor --models smollm2-135m gemma3-270m --out benchmarks/results/predictor.json

For each model, on the CPU in fp32, with the same protocol as ``benchmarks.accuracy``
(WikiText-2 test articles 0-9 calibrate and train, articles 10+ evaluate; its helpers are
imported, so the figures are comparable with benchmarks/results/accuracy.json):

* dense, then predictor plans at every target (trained once, on labels at ``--label-sparsity``,
  or per target), each run through the sparse backend (``compiler="eager"``): perplexity and
  zero-shot tasks; per-layer recall and precision on held-out calibration tokens;
* CATS at the same targets (perplexity), the comparison the accuracy target names;
* MLP weight bytes read per token for every method: from the masks measured on the evaluation
  text for the rows evaluated here (predictor, cats), from the plans' calibration-measured
  sparsities for teal, cett and stat-topk. A predictor's own weights count as read.

Target: at the WikiText-2 perplexity of cats at 50%, the predictor reads at least 25% fewer
MLP weight bytes per token (log-linear interpolation between predictor rows).

``--add-tasks`` evaluates only the tasks of existing predictor rows at ``--task-targets`` that
lack them, retraining the predictor with the file's seed and settings, so tasks can be filled in
later without recomputing perplexity or bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from .accuracy import MaskObserver, _evaluate, _evaluate_tasks, _in, _strip
from .harness import log as _log, write_json as _write_json

TARGETS = (0.25, 0.4, 0.5, 0.6)
TASKS = ("piqa", "arc_easy", "winogrande")
BYTE_METHODS = ("teal", "cats", "cett", "stat-topk")


# ---------------------------------------------------------------------------------- observing


class Observer(MaskObserver):
    """MaskObserver that also sees the predicted MLP's masks (gate, up and down alike)."""

    def predicted(self, x, mask, w_gate, w_up, w_down, *rest):
        if not self.active:
            return
        m = mask.detach().reshape(-1, mask.shape[-1])
        for w in (w_gate, w_up, w_down):
            self._add(w, m)

    def per_weight(self) -> dict[tuple, float]:
        return {k: z / max(r, 1) for k, (z, r, _) in self.sums.items()}


class ObservingBackend:
    """The actsparse backend (eager compiler) plus an observer call before each actsparse op."""

    def __init__(self, plan, observer: Observer) -> None:
        import actsparse

        self.inner = actsparse.backend(plan, compiler="eager", relayout="off")
        self.observer = observer

    def __call__(self, gm, example_inputs):
        self.inner(gm, example_inputs)
        fns = {torch.ops.actsparse.sparse_linear.default: self.observer.linear,
               torch.ops.actsparse.gated_mlp.default: self.observer.gated,
               torch.ops.actsparse.predicted_mlp.default: self.observer.predicted}
        for node in list(gm.graph.nodes):
            fn = fns.get(node.target) if node.op == "call_function" else None
            if fn is not None:
                with gm.graph.inserting_before(node):
                    gm.graph.call_function(fn, node.args, node.kwargs)
        gm.recompile()
        return gm.forward


def measured_by_module(model, observer: Observer) -> dict[str, float]:
    """The observer's per-weight sparsities, keyed by module name."""
    per = observer.per_weight()
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            key = (w.data_ptr(), tuple(w.shape))
            if key in per:
                out[name] = round(per[key], 6)
    return out


# ---------------------------------------------------------------------------------- bytes


def mlp_bytes_per_token(sites, plan, sparsity: dict[str, float], dtype_bytes: int = 2) -> dict:
    """MLP weight bytes one token reads under ``plan`` with per-module ``sparsity``.

    Per gated MLP: gate and up rows and down columns, each scaled by (1 - its measured
    sparsity); a module without a measured sparsity is read in full (the gate under CATS).
    A predictor's weights (W1, W2, b2) are read in full. ``dtype_bytes`` (2: bf16 at decode)
    scales everything alike, so the ratio to dense does not depend on it.
    """
    from actsparse.calibration.predictor import gated_mlps

    total = dense = pred = 0.0
    for s in gated_mlps(sites):
        d, n = s.out_features, s.in_features  # down projection: n neurons -> d outputs
        size = d * n * dtype_bytes
        dense += 3 * size
        total += sum(size * (1.0 - float(sparsity.get(m, 0.0))) for m in (s.gate, s.up, s.module))
        spec = (plan.predictors or {}).get(s.module) if plan is not None else None
        if spec:
            pred += (spec["rank"] * (spec["in_features"] + spec["neurons"]) + spec["neurons"]) * dtype_bytes
    return {"bytes": round(total + pred), "predictor_bytes": round(pred), "dense_bytes": round(dense),
            "ratio": round((total + pred) / dense, 5) if dense else None, "dtype_bytes": dtype_bytes}


def _keep(sparsity: float, n: int) -> int:
    return min(n, max(1, int(round((1.0 - sparsity) * n))))


@contextlib.contextmanager
def oracle_masks(model, sites, sparsity: float):
    """Eager hooks: each gated MLP keeps the top (1 - s) n of |act(gate x) * up x| per token.

    What a perfect predictor of the ``topk`` labels would give: the upper bound of the method
    at this sparsity (it needs the dense gate and up to know the mask, so it saves no bytes
    itself; it tells how much a better predictor could win).
    """
    import torch.nn.functional as F

    from actsparse.calibration.predictor import gated_mlps
    from actsparse.ops.reference import activation

    mods = dict(model.named_modules())
    handles = []

    def hook(s):
        gate, up, down = mods[s.gate], mods[s.up], mods[s.module]
        keep = _keep(sparsity, s.in_features)

        def fn(mlp, args, out):
            x = args[0]
            h = activation(s.act, F.linear(x, gate.weight, gate.bias)) * F.linear(x, up.weight, up.bias)
            kth = torch.topk(h.abs(), keep, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
            return F.linear(torch.where(h.abs() >= kth, h, torch.zeros((), dtype=h.dtype)), down.weight, down.bias)
        return fn

    for s in gated_mlps(sites):
        mlp = mods[s.module.rsplit(".", 1)[0]]
        handles.append(mlp.register_forward_hook(hook(s)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------- per model


def run_model(name: str, args, out: Path) -> dict:
    from actsparse import models
    from actsparse.calibration import Calibrator, wikitext2_split
    from actsparse.calibration.predictor import PredictorConfig, PredictorTrainer, gated_mlps
    from actsparse.calibration.sites import masked_sites, trace_sites

    data = json.loads(out.read_text()) if args.resume and out.exists() else {}
    rows = data.get("rows", [])
    done = {(r["method"], r.get("target")) for r in rows}
    model, tok = models.load(name)
    cal_text, eval_text, split = wikitext2_split(args.data, args.calibration_articles)
    data.update({"config": _config(args, split), "model": name, "rows": rows})
    data.setdefault("bytes", {})
    data.setdefault("seconds", {})

    def save(row=None):
        if row is not None:
            rows.append(row)
        _write_json(out, data)

    tasks = list(args.tasks)
    if ("dense", None) not in done:
        _log(f"{name}: dense")
        save({"model": name, "method": "dense", "target": None, "effective_sparsity": 0.0,
              "mlp_bytes": {"ratio": 1.0}, **_evaluate(model, tok, eval_text, args, tasks, None)})
    lazy: dict = {}

    def calibrator():
        if "cal" not in lazy:
            t0 = time.perf_counter()
            lazy["cal"] = Calibrator(model, cal_text, tok, methods=BYTE_METHODS, token_budget=args.calib_tokens,
                                     batch_size=args.batch_size, seq_len=args.window, seed=args.seed,
                                     progress=False, source=split["source"], cett_tokens=args.cett_tokens)
            data["seconds"]["threshold_statistics"] = round(time.perf_counter() - t0, 1)
        return lazy["cal"]

    def trainer():
        if "trainer" not in lazy:
            cfg = PredictorConfig(rank=args.rank, label=args.label, selection=args.selection, epochs=args.epochs,
                                  lr=args.lr, seed=args.seed)
            t0 = time.perf_counter()
            tr = lazy["trainer"] = PredictorTrainer(model, cal_text, tok, config=cfg, token_budget=args.train_tokens,
                                                    batch_size=args.batch_size, seq_len=args.window,
                                                    progress=args.progress, source=split["source"])
            data["seconds"]["predictor_inputs"] = round(time.perf_counter() - t0, 1)
            data["predictor_config"] = {**vars(cfg), "label_sparsity": args.label_sparsity,
                                        "train_tokens": tr.split,
                                        "held_out_tokens": len(next(iter(tr.inputs.values()))) - tr.split}
        return lazy["trainer"]

    sites = trace_sites(model)
    total = sum(s.params for s in masked_sites(sites))
    methods = [m for m in ("predictor", "cats", "oracle") if m in args.methods]
    for target in args.targets:
        # bytes of the threshold methods, from their plans' calibration-measured sparsities
        for method in BYTE_METHODS:
            if f"{method}@{target}" not in data["bytes"]:
                plan = calibrator().plan(method, target)
                data["bytes"][f"{method}@{target}"] = {**mlp_bytes_per_token(sites, plan, plan.measured),
                                                       "sparsity_from": "calibration (plan.measured)"}
                save()
        for method in methods:
            if (method, target) in done:
                continue
            t0 = time.perf_counter()
            observer = Observer(total)
            row_tasks = tasks if method == "predictor" and any(abs(target - t) < 1e-9 for t in args.task_targets) \
                else []
            if method == "oracle":
                with oracle_masks(model, sites, target):
                    row = {"model": name, "method": method, "target": target,
                           **_evaluate(model, tok, eval_text, args, [], None)}
                ms = {m: target_sparsity for s in gated_mlps(sites) for m in (s.gate, s.up, s.module)
                      for target_sparsity in [1 - _keep(target, s.in_features) / s.in_features]}
                row["mlp_bytes"] = {**mlp_bytes_per_token(sites, None, ms),
                                    "sparsity_from": "exact: top-k of each token"}
                row["effective_sparsity"] = round(sum(ms.get(s.module, 0.0) * s.params for s in masked_sites(sites))
                                                  / total, 4)
            else:
                if method == "predictor":
                    plan = trainer().plan(target, args.label_sparsity)
                    train_s = plan.info["predictor"]["train_seconds"]
                else:
                    plan = calibrator().plan("cats", target)
                torch._dynamo.reset()
                fwd = torch.compile(model, backend=ObservingBackend(plan, observer))
                row = {"model": name, "method": method, "target": target, "overall_sparsity": plan.overall_sparsity,
                       **_evaluate(fwd, tok, eval_text, args, row_tasks, observer)}
                measured = measured_by_module(model, observer)
                row["mlp_bytes"] = {**mlp_bytes_per_token(sites, plan, measured),
                                    "sparsity_from": "masks measured on the perplexity text"}
            if method == "predictor":
                info = plan.info["predictor"]
                row["predictor"] = {k: info[k] for k in ("label_sparsity", "mean_recall", "mean_precision",
                                                         "mean_mass_recall", "train_tokens", "held_out_tokens")}
                row["predictor"]["train_seconds"] = train_s
                row["predictor"]["rank"] = next(iter(plan.predictors.values()))["rank"]
                row["layers"] = {k: {m: v[m] for m in ("recall", "precision", "sparsity", "mass_recall",
                                                        "label_mass_recall", "held_loss_init", "held_loss")}
                                 for k, v in info["layers"].items()}
                if args.save_plans:
                    plan.save(Path(args.save_plans) / f"predictor_{name}_{target}.json")
            row["seconds"] = round(time.perf_counter() - t0, 1)
            save(row)
            extra = f", recall {row['predictor']['mean_recall']:.3f}" if method == "predictor" else ""
            _log(f"{name}: {method} @ {target}: ppl {row['ppl']:.3f}, MLP bytes {row['mlp_bytes']['ratio']:.3f} "
                 f"of dense{extra}, {row['seconds']} s")
    torch._dynamo.reset()
    save()
    return data


#: Settings a row's predictor depends on: ``--add-tasks`` retrains it only if they match the file's.
_SAME = ("rank", "label", "selection", "epochs", "lr", "seed", "label_sparsity")


def _mismatch(args, data: dict) -> list[str]:
    """Settings in ``args`` that differ from the ones the file's rows were made with."""
    pc, cfg = data.get("predictor_config", {}), data.get("config", {})
    bad = [f"--{a.replace('_', '-')} {getattr(args, a)} (file: {pc.get(a)})"
           for a in _SAME if pc.get(a) != getattr(args, a)]
    for a, k in (("train_tokens", "predictor_train_tokens"), ("limit", "task_limit"), ("seed", "task_seed"),
                 ("window", "window")):
        if cfg.get(k) != getattr(args, a):
            bad.append(f"--{a.replace('_', '-')} {getattr(args, a)} (file: {cfg.get(k)})")
    return bad


def add_tasks(name: str, args, out: Path) -> dict:
    """``--add-tasks``: the tasks for existing predictor rows at ``--task-targets`` that lack them.

    Perplexity, bytes and recall stay as they are; the predictor is retrained with the file's
    settings and seed (refused if ``args`` differ), and its held-out recall is stored next to the
    row's as ``tasks_recall`` so a retrained predictor that is not the same one shows.
    """
    from actsparse import models
    from actsparse.calibration import wikitext2_split
    from actsparse.calibration.predictor import PredictorConfig, PredictorTrainer
    from actsparse.calibration.sites import masked_sites, trace_sites

    data = json.loads(out.read_text())
    todo = [r for r in data["rows"] if r["method"] == "predictor" and _in(r["target"], args.task_targets)
            and not all(t in r for t in args.tasks)]
    if not todo:
        return data
    bad = _mismatch(args, data)
    if bad:
        raise SystemExit(f"{out}: settings differ from the file's rows: " + ", ".join(bad))
    model, tok = models.load(name)
    cal_text, _, split = wikitext2_split(args.data, args.calibration_articles)
    cfg = PredictorConfig(rank=args.rank, label=args.label, selection=args.selection, epochs=args.epochs,
                          lr=args.lr, seed=args.seed)
    trainer = PredictorTrainer(model, cal_text, tok, config=cfg, token_budget=args.train_tokens,
                               batch_size=args.batch_size, seq_len=args.window, progress=args.progress,
                               source=split["source"])
    total = sum(s.params for s in masked_sites(trace_sites(model)))
    for row in todo:
        plan = trainer.plan(row["target"], args.label_sparsity)
        recall = plan.info["predictor"]["mean_recall"]
        torch._dynamo.reset()
        fwd = torch.compile(model, backend=ObservingBackend(plan, Observer(total)))
        row.update(_evaluate_tasks(fwd, tok, args, list(args.tasks)))
        row["tasks_recall"] = recall
        row["tasks_added_by"] = "python -m benchmarks.predictor " + " ".join(sys.argv[1:])
        done = sorted({r["target"] for r in data["rows"] if r["method"] == "predictor" and args.tasks[0] in r})
        data["config"]["task_targets"] = done
        _write_json(out, data)
        _log(f"{name}: predictor @ {row['target']}: recall {recall:.4f} (row: {row['predictor']['mean_recall']:.4f}), "
             "tasks " + ", ".join(f"{t} {row[t].get('acc', float('nan')):.3f}" for t in args.tasks))
    torch._dynamo.reset()
    return data


def _config(args, split: dict) -> dict:
    return {
        "command": "python -m benchmarks.predictor " + " ".join(sys.argv[1:]),
        "calibration_text": split["calibration"], "evaluation_text": split["evaluation"],
        "predictor_train_tokens": args.train_tokens, "threshold_calibration_tokens": args.calib_tokens,
        "eval_tokens": args.eval_tokens, "window": args.window, "tasks": list(args.tasks),
        "task_limit": args.limit, "task_targets": list(args.task_targets), "task_seed": args.seed,
        "targets": list(args.targets), "dtype": "float32", "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "compiler": "actsparse backend, compiler='eager' (masked graph without Inductor)",
        "target_meaning": "predictor: fraction of MLP neurons skipped (gate, up and down); cats: fraction "
                          "of MLP neurons skipped in up and down (gate read in full)",
        "bytes": "MLP weight bytes read per token at batch 1, as a ratio to the dense MLP; predictor "
                 "weights included; same dtype for every method",
    }


# ---------------------------------------------------------------------------------- reports


def _interp(points: list[tuple[float, float]], at_ppl: float) -> float | None:
    """Bytes ratio at which ppl == at_ppl, log-linear in ppl between bracketing points."""
    pts = sorted(points)
    for (b0, p0), (b1, p1) in zip(pts, pts[1:]):
        lo, hi = sorted((p0, p1))
        if lo <= at_ppl <= hi and p0 != p1:
            w = (math.log(at_ppl) - math.log(p0)) / (math.log(p1) - math.log(p0))
            return b0 + w * (b1 - b0)
    return None


def target_check(rows: list[dict], at: float = 0.5, method: str = "predictor") -> dict | None:
    """Bytes ``method`` reads at the perplexity of cats at ``at``, against cats' bytes there."""
    cats = next((r for r in rows if r["method"] == "cats" and abs(r["target"] - at) < 1e-9), None)
    pts = [(r["mlp_bytes"]["ratio"], r["ppl"]) for r in rows if r["method"] == method]
    if cats is None or not pts:
        return None
    cats_bytes, cats_ppl = cats["mlp_bytes"]["ratio"], cats["ppl"]
    b = _interp(pts, cats_ppl)
    res = {"method": method, "cats_target": at, "cats_ppl": cats_ppl, "cats_bytes_ratio": cats_bytes}
    note = None
    if b is None:
        best = min(pts, key=lambda p: p[1])
        if best[1] > cats_ppl:
            note = (f"no {method} row reaches the perplexity of cats at {at:.0%} ({cats_ppl:.2f}): its lowest is "
                    f"{best[1]:.2f}, at {best[0]:.3f} of the dense MLP bytes")
        else:  # every row is better than cats: at most the bytes of the sparsest row tried
            b = min(p[0] for p in pts if p[1] <= cats_ppl)
            note = (f"every {method} row has a lower perplexity than cats at {at:.0%}; the bytes are an upper "
                    "bound, those of its sparsest row")
    res["bytes_ratio_at_cats_ppl"] = None if b is None else round(b, 4)
    res["bytes_reduction_vs_cats"] = None if b is None else round(1 - b / cats_bytes, 4)
    res["met"] = bool(b is not None and 1 - b / cats_bytes >= 0.25)
    if note:
        res["note"] = note
    return res


def _check_line(chk: dict, label: str) -> str:
    b = chk.get("bytes_ratio_at_cats_ppl")
    return (f"{label}: at the perplexity of cats at {chk['cats_target']:.0%} ({chk['cats_ppl']:.2f}, reading "
            f"{chk['cats_bytes_ratio']:.3f} of the dense MLP bytes) {chk['method']} reads "
            + ("(not reached)" if b is None else f"{b:.3f}")
            + (f", {chk['bytes_reduction_vs_cats']:.1%} fewer" if chk.get("bytes_reduction_vs_cats") is not None else "")
            + f" (target >= 25% fewer: {'met' if chk['met'] else 'not met'})."
            + (f" {chk['note'][0].upper() + chk['note'][1:]}." if chk.get("note") else ""))


def markdown(result: dict) -> str:
    cfg = result.get("config", {})
    lines = ["# Learned activation predictors against CATS (CPU, fp32)", "",
             f"Command: `{cfg.get('command', '')}`", "",
             f"Predictors trained on {cfg.get('calibration_text')} ({cfg.get('predictor_train_tokens')} tokens, "
             f"last 10% of sequences held out for recall/precision); CATS/TEAL/CETT calibrated on the same articles "
             f"({cfg.get('threshold_calibration_tokens')} tokens); perplexity on {cfg.get('evaluation_text')}, first "
             f"{cfg.get('eval_tokens')} tokens in windows of {cfg.get('window')}; tasks: "
             f"{', '.join(cfg.get('tasks', []))}, {cfg.get('task_limit')} examples each at targets "
             f"{cfg.get('task_targets')}. Target: {cfg.get('target_meaning')}. Bytes: {cfg.get('bytes')}. "
             "`oracle`: the top-k of |act(gate x) * up x| per token applied exactly (a perfect predictor of the "
             "labels, predictor bytes not counted): the bound a better predictor could approach.", ""]
    for model, data in result.get("models", {}).items():
        rows = data.get("rows", [])
        pc = data.get("predictor_config", {})
        lines += [f"## {model}", "",
                  f"Predictor: rank {next((r['predictor']['rank'] for r in rows if r.get('predictor')), '?')} "
                  f"({pc.get('rank')} of d), labels `{pc.get('label')}` at sparsity "
                  f"{pc.get('label_sparsity') or 'of each target'}, selection `{pc.get('selection')}`, "
                  f"{pc.get('epochs')} epochs, {pc.get('train_tokens')} training / {pc.get('held_out_tokens')} "
                  "held-out tokens.", "",
                  "Recall / precision: mean over layers on held-out calibration tokens, against the labels at the "
                  "row's target (a random selection gets 1 - s); with top-k selection and top-k labels both keep "
                  "k neurons per token, so precision equals recall. Mass recall: the share of sum |act(gate) * up| "
                  "the selected neurons carry.", "",
                  "| method | target | effective sparsity | MLP bytes / dense | ppl | recall | precision | mass recall | "
                  + " | ".join(f"{t} acc" for t in cfg.get("tasks", [])) + " |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(cfg.get("tasks", []))]
        for r in sorted(rows, key=lambda r: (r["method"] != "dense", r["method"], r.get("target") or 0)):
            p = r.get("predictor", {})
            accs = [f"{r[t]['acc']:.3f}" if t in r else "" for t in cfg.get("tasks", [])]
            tgt = "" if r.get("target") is None else f"{r['target']:.2f}"
            rec = f"{p['mean_recall']:.3f}" if p else ""
            pre = f"{p['mean_precision']:.3f}" if p else ""
            mass = f"{p['mean_mass_recall']:.3f}" if p else ""
            lines.append(f"| {r['method']} | {tgt} | {r.get('effective_sparsity', 0):.3f} | "
                         f"{r['mlp_bytes']['ratio']:.3f} | {r['ppl']:.2f} | {rec} | {pre} | {mass} | "
                         + " | ".join(accs) + " |")
        by = data.get("bytes", {})
        if by:
            lines += ["", "MLP weight bytes per token / dense, other methods (calibration-measured sparsities):", "",
                      "| method | " + " | ".join(f"{t:.2f}" for t in cfg.get("targets", [])) + " |",
                      "|---|" + "---|" * len(cfg.get("targets", []))]
            for m in BYTE_METHODS:
                vals = [by.get(f"{m}@{t}", {}).get("ratio") for t in cfg.get("targets", [])]
                lines.append(f"| {m} | " + " | ".join("" if v is None else f"{v:.3f}" for v in vals) + " |")
        chk = result.get("target_check", {}).get(model)
        if chk:
            lines += ["", _check_line(chk, "Target")]
        bound = result.get("oracle_check", {}).get(model)
        if bound:
            lines += ["", _check_line(bound, "Bound (perfect predictor, predictor bytes not counted)")]
        layer_rows = [r for r in rows if r["method"] == "predictor"]
        if layer_rows:
            lines += ["", "Per-layer recall / precision on held-out calibration tokens (predictor vs its labels):", "",
                      "| layer | " + " | ".join(f"{r['target']:.2f} recall | {r['target']:.2f} precision"
                                                for r in layer_rows) + " |",
                      "|---|" + "---|---|" * len(layer_rows)]
            for name in layer_rows[0]["layers"]:
                vals = []
                for r in layer_rows:
                    v = r["layers"][name]
                    vals.append(f"{v['recall']:.3f} | {v['precision']:.3f}")
                lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result.get("models", {}))
    fig, axes = plt.subplots(2, max(1, len(models)), figsize=(6 * max(1, len(models)), 8.5), squeeze=False)
    for i, model in enumerate(models):
        rows = result["models"][model].get("rows", [])
        ax = axes[0][i]
        for method, marker in (("predictor", "o"), ("cats", "s"), ("oracle", "^")):
            pts = sorted((r["mlp_bytes"]["ratio"], r["ppl"]) for r in rows if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                        label=method + (" (perfect predictor, bound)" if method == "oracle" else ""))
        dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
        if dense is not None:
            ax.axhline(dense, color="k", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("MLP weight bytes read per token / dense")
        ax.set_ylabel("WikiText-2 perplexity (held-out articles)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1][i]
        for r in rows:
            if r["method"] != "predictor":
                continue
            rec = [v["recall"] for v in r["layers"].values()]
            ax.plot(range(len(rec)), rec, marker=".", label=f"recall @ {r['target']:.2f}")
        ax.set_xlabel("layer")
        ax.set_ylabel("held-out recall of the predicted neurons")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(per_model: dict[str, dict], out: Path) -> dict:
    first = next(iter(per_model.values()), {})
    result = {"config": first.get("config", {}), "models": per_model}
    result["target_check"] = {m: target_check(d.get("rows", [])) for m, d in per_model.items()}
    result["oracle_check"] = {m: target_check(d.get("rows", []), method="oracle") for m, d in per_model.items()}
    _write_json(out, result)
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    return result


# ---------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predictor", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    add("--targets", nargs="+", type=float, default=list(TARGETS))
    add("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    add("--task-targets", nargs="*", type=float, default=list(TARGETS))
    add("--limit", type=int, default=60, help="examples per task (default: %(default)s)")
    add("--eval-tokens", type=int, default=4096)
    add("--window", type=int, default=512)
    add("--calib-tokens", type=int, default=4096, help="calibration tokens of the threshold methods")
    add("--train-tokens", type=int, default=32768, help="predictor training tokens (incl. held-out)")
    add("--calibration-articles", type=int, default=10)
    add("--rank", type=float, default=0.08, help="predictor rank: integer, or fraction of d below 1")
    add("--label", default="topk", choices=["topk", "cats"])
    add("--label-sparsity", type=float, default=None,
        help="train once on labels at this sparsity for every target (default: train per target)")
    add("--selection", default="topk", choices=["topk", "threshold"])
    add("--epochs", type=int, default=8)
    add("--methods", nargs="+", default=["predictor", "cats", "oracle"], choices=["predictor", "cats", "oracle"],
        help="rows to evaluate: predictor, cats, and the oracle top-k bound (default: all)")
    add("--lr", type=float, default=3e-3)
    add("--cett-tokens", type=int, default=256)
    add("--batch-size", type=int, default=4)
    add("--seed", type=int, default=0)
    add("--data", default=None, metavar="DIR")
    add("--threads", type=int, default=1)
    add("--jobs", type=int, default=2)
    add("--resume", action="store_true")
    add("--add-tasks", action="store_true",
        help="only evaluate the tasks for existing predictor rows at --task-targets that lack them")
    add("--progress", action="store_true")
    add("--save-plans", default=None, metavar="DIR", help="also save each predictor plan (JSON + safetensors)")
    add("--out", default="benchmarks/results/predictor.json")
    return p


def _model_out(out: Path, model: str) -> Path:
    return out.with_name(f"{out.stem}_{model}.json")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if len(args.models) > 1 and args.jobs > 1:
        argv = list(sys.argv[1:] if argv is None else argv)
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.predictor",
                                   *_strip(argv, "--models", "--out", "--jobs"), "--models", m, "--jobs", "1",
                                   "--out", str(_model_out(out, m))]) for m in args.models]
        codes = [p.wait() for p in procs]
        if any(codes):
            _log(f"model processes exited with {codes}; merging what was written")
    else:
        for model in args.models:
            target = out if len(args.models) == 1 and out.stem.endswith(model) else _model_out(out, model)
            (add_tasks if args.add_tasks else run_model)(model, args, target)
    if len(args.models) == 1 and out.stem.endswith(args.models[0]):
        return 0
    per_model = {m: json.loads(_model_out(out, m).read_text()) for m in args.models if _model_out(out, m).exists()}
    res = merge(per_model, out)
    _log(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    for m, chk in res["target_check"].items():
        _log(f"{m}: target check {chk}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
