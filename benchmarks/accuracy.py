"""Accuracy of each calibration method against dense: WikiText-2 perplexity and zero-shot tasks.

    python -m benchmarks.accuracy --models smollm2-135m gemma3-270m --out benchmarks/results/accuracy.json

For each model: the dense model, then every method at every target, each evaluated through
the sparse backend with ``compiler="eager"`` (the masked graph the backend builds, run
without Inductor). Calibration uses WikiText-2 test articles 0-9 and perplexity the articles
10+, so no plan is scored on its own calibration text. The effective sparsity of each row is
measured on the evaluation text itself, from the masks the compiled graph really applies
(observer nodes added after the backend's rewrite), weighted by parameters over every
maskable decoder linear, like ``SparsityPlan.overall_sparsity``.

One statistics pass per model serves every method and target, and the greedy path is run
once up to the largest target. Rows are written to the JSON as they finish, so an
interrupted run keeps its rows and ``--resume`` continues it. With several models and
``--jobs`` > 1 each model runs in its own process (one thread each: on a small shared
machine two busy threads in one process are several times slower than one, from OpenMP
waits), then the per-model files are merged. ``--render`` only re-writes the markdown and the
plot from the JSON; the learned-predictor rows and the MLP weight bytes per token come from
``predictor_<model>.json`` next to it (``benchmarks.predictor``) when it exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import log, write_json

TASKS = ("piqa", "arc_easy", "winogrande")
TARGETS = (0.25, 0.4, 0.5, 0.6)
#: Row labels for WINA scores on top of a TEAL method (``calibrate(..., wina=True)``).
WINA_METHODS = {"teal+wina": "teal", "teal-greedy+wina": "teal-greedy"}


def base_method(label: str) -> tuple[str, bool]:
    """(calibration method, wina) of a row label."""
    return (WINA_METHODS[label], True) if label in WINA_METHODS else (label, False)


# ---------------------------------------------------------------------------------- observing


class MaskObserver:
    """Counts, per masked weight, the fraction of its input entries the mask zeroes.

    Inserted as graph nodes right before each actsparse op, with the same arguments, so it
    sees exactly the masks the compiled graph applies.
    """

    def __init__(self, total_params: int) -> None:
        self.total_params = total_params
        self.active = True
        self.sums: dict[tuple, list[float]] = {}  # weight key -> [sum of zero fractions * rows, rows, numel]
        self.lowrank: dict[str, int] = {}  # rsparse factors (key -> r * (in + out)): read every token

    def _add(self, w: torch.Tensor, mask: torch.Tensor) -> None:
        key = (w.data_ptr(), tuple(w.shape))
        rows = mask.shape[0]
        zero = float((~mask).float().mean(dim=1).sum())
        acc = self.sums.setdefault(key, [0.0, 0.0, float(w.numel())])
        acc[0] += zero
        acc[1] += rows

    def linear(self, x, weights, biases, thresholds, per_token, hint=None):
        if not self.active:
            return
        from actsparse.ops.reference import input_mask

        x2 = x.detach().reshape(-1, x.shape[-1])
        for w, t in zip(weights, thresholds):
            self._add(w, input_mask(x2, t, per_token))

    def channel(self, x, weights, biases, cutoffs_key, hint=None):
        if not self.active:
            return
        from actsparse.ops import constants

        x2 = x.detach().reshape(-1, x.shape[-1])
        for w, tau in zip(weights, constants.lookup(cutoffs_key)):
            self._add(w, x2.abs().float() > tau.to(x2.device))

    def gated(self, x, w_gate, w_up, w_down, b_gate, b_up, b_down, act, t, per_token=False, hint=None):
        if not self.active:
            return
        import torch.nn.functional as F

        from actsparse.ops.reference import activation, input_mask

        x2 = x.detach().reshape(-1, x.shape[-1])
        g = activation(act, F.linear(x2.float(), w_gate.float(), None if b_gate is None else b_gate.float()))
        mask = input_mask(g, t, per_token)
        self._add(w_up, mask)
        self._add(w_down, mask)

    def lowrank_factors(self, x, key, out_features, threshold):
        if self.active:
            from actsparse.ops import constants

            self.lowrank[key] = sum(t.numel() for t in constants.lookup(key))

    def sparsity(self) -> float:
        """Effective: weights skipped minus the low-rank factors read (rsparse), over the total."""
        skipped = sum(p * z / max(r, 1) for z, r, p in self.sums.values()) - sum(self.lowrank.values())
        return skipped / self.total_params if self.total_params else 0.0

    def masked_sparsity(self) -> float:
        """Fraction of the masked linears' inputs zeroed, parameter-weighted over those linears only.

        This is the quantity a plan's target names (teal-style: every masked input; cats: the
        MLP neurons), so it is the one to compare with the target on another text.
        """
        params = sum(p for _, _, p in self.sums.values())
        skipped = sum(p * z / max(r, 1) for z, r, p in self.sums.values())
        return skipped / params if params else 0.0

    def reset(self) -> None:
        """Forget the counts, to measure a second text with the same compiled graph."""
        self.sums.clear()
        self.lowrank.clear()
        self.active = True


class ObservingBackend:
    """The actsparse backend (eager compiler) plus a MaskObserver node before each actsparse op."""

    def __init__(self, plan, observer: MaskObserver) -> None:
        import actsparse

        self.inner = actsparse.backend(plan, compiler="eager", relayout="off")
        self.observer = observer

    def __call__(self, gm, example_inputs):
        compiled = self.inner(gm, example_inputs)  # rewrites gm in place; holds the graph's constants
        fns = {torch.ops.actsparse.sparse_linear.default: self.observer.linear,
               torch.ops.actsparse.channel_sparse_linear.default: self.observer.channel,
               torch.ops.actsparse.gated_mlp.default: self.observer.gated,
               torch.ops.actsparse.lowrank_complement.default: self.observer.lowrank_factors}
        from actsparse.ops.dense import masked_gated_mlp, masked_input

        fns[masked_gated_mlp] = self.observer.gated  # CATS's masked dense form (prefill): same arguments
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is masked_input:  # the masked dense form (prefill)
                ws = [u.args[1] for u in node.users if u.op == "call_function" and u.args and u.args[0] is node
                      and u.target in (torch._C._nn.linear, torch.nn.functional.linear)]
                per_token = node.args[2] if len(node.args) > 2 else node.kwargs.get("per_token", False)
                if ws:
                    with gm.graph.inserting_before(node):
                        gm.graph.call_function(self.observer.linear, (node.args[0], ws, [None] * len(ws),
                                                                      [node.args[1]] * len(ws), per_token))
                continue
            fn = fns.get(node.target)
            if node.op == "call_function" and fn is not None:
                with gm.graph.inserting_before(node):
                    gm.graph.call_function(fn, node.args, node.kwargs)
        gm.recompile()

        def run(*args, _constants_owner=compiled):
            return gm.forward(*args)

        return run


# ---------------------------------------------------------------------------------- evaluation


def _evaluate_tasks(fwd, tokenizer, args, tasks: list[str]) -> dict:
    """Zero-shot task accuracies of ``fwd`` (a row's task fields)."""
    from actsparse.eval import evaluate_task

    row: dict = {}
    for task in tasks:
        t0 = time.perf_counter()
        res = evaluate_task(fwd, tokenizer, task, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                            data_dir=args.data, progress=False)
        row[task] = {k: round(v, 4) for k, v in res.metrics.items()}
        row[task]["n"] = res.n
        row[task]["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def add_tasks(name: str, args, out: Path) -> dict:
    """``--add-tasks``: evaluate the tasks for existing rows at ``--task-targets`` that lack them."""
    from actsparse import models
    from actsparse.calibration import Calibrator, wikitext2_split
    from actsparse.calibration.sites import masked_sites

    data = json.loads(out.read_text())
    rows = data["rows"]
    todo = [r for r in rows if r["method"] in args.methods and r.get("target") is not None
            and _in(r["target"], args.task_targets) and not all(t in r for t in args.tasks)]
    if not todo:
        return data
    model, tok = models.load(name)
    cal_text, _, split = wikitext2_split(args.data, args.calibration_articles)
    bases = sorted({base_method(r["method"])[0] for r in todo})
    cal = Calibrator(model, cal_text, tok, methods=bases, token_budget=args.calib_tokens,
                     batch_size=args.batch_size, seq_len=args.window, seed=args.seed, progress=False,
                     source=split["source"], cett_tokens=args.cett_tokens, greedy_step=args.greedy_step,
                     greedy_tokens=args.greedy_tokens, wina=any(base_method(r["method"])[1] for r in todo))
    total = sum(s.params for s in masked_sites(cal.sites))
    for row in todo:
        base, wina = base_method(row["method"])
        plan = cal.plan(base, row["target"], wina=wina)
        torch._dynamo.reset()
        fwd = torch.compile(model, backend=ObservingBackend(plan, MaskObserver(total)))
        row.update(_evaluate_tasks(fwd, tok, args, list(args.tasks)))
        row["tasks_added_by"] = "python -m benchmarks.accuracy " + " ".join(sys.argv[1:])
        write_json(out, data)
        log(f"{name}: {row['method']} @ {row['target']}: tasks " +
             ", ".join(f"{t} {row[t].get('acc', float('nan')):.3f}" for t in args.tasks))
    torch._dynamo.reset()
    return data


def _evaluate(fwd, tokenizer, eval_text: str, args, tasks: list[str], observer: MaskObserver | None) -> dict:
    from actsparse.eval import perplexity

    row: dict = {}
    t0 = time.perf_counter()
    r = perplexity(fwd, tokenizer, text=eval_text, window=args.window, max_tokens=args.eval_tokens,
                   batch_size=args.batch_size, progress=False)
    row["ppl"], row["nll"], row["ppl_tokens"] = r.ppl, r.nll, r.tokens
    row["ppl_seconds"] = round(time.perf_counter() - t0, 1)
    if observer is not None:
        row["effective_sparsity"] = round(observer.sparsity(), 4)
        row["masked_sparsity"] = round(observer.masked_sparsity(), 4)
    if getattr(args, "second_text", "none") != "none":
        row["second_text"] = _evaluate_second(fwd, tokenizer, args, observer)
    if observer is not None:
        observer.active = False  # tasks are not part of the sparsity measurement
    row.update(_evaluate_tasks(fwd, tokenizer, args, tasks))
    return row


def second_text(args) -> str:
    """The second evaluation text (``--second-text``): LAMBADA contexts, a seeded subset joined.

    LAMBADA passages are fiction (BookCorpus), another domain than the WikiText-2 articles the
    plans are calibrated on; the contexts alone (without the target word) make plain text.
    """
    from actsparse.eval.data import load_task

    if args.second_text != "lambada":
        raise ValueError(f"unknown second text {args.second_text!r}; allowed: none, lambada")
    docs = load_task("lambada", args.data, limit=args.second_docs, seed=args.seed)
    return "\n\n".join(d["context"].strip() for d in docs)


def _evaluate_second(fwd, tokenizer, args, observer: MaskObserver | None) -> dict:
    """Perplexity and achieved sparsity of a row on the second text, with the same compiled graph."""
    from actsparse.eval import perplexity

    if observer is not None:
        observer.reset()
    t0 = time.perf_counter()
    r = perplexity(fwd, tokenizer, text=second_text(args), window=args.window,
                   max_tokens=args.second_tokens or args.eval_tokens, batch_size=args.batch_size, progress=False)
    out = {"name": args.second_text, "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens,
           "seconds": round(time.perf_counter() - t0, 1)}
    if observer is not None:
        out["effective_sparsity"] = round(observer.sparsity(), 4)
        out["masked_sparsity"] = round(observer.masked_sparsity(), 4)
    return out


def run_model(name: str, args, out: Path) -> dict:
    """All rows of one model; writes ``out`` after each row."""
    from actsparse import models
    from actsparse.calibration import Calibrator, greedy_for, wikitext2_split
    from actsparse.calibration.sites import masked_sites

    data = json.loads(out.read_text()) if args.resume and out.exists() else {}
    rows = data.get("rows", [])
    done = {(r["method"], r.get("target")) for r in rows}
    model, tok = models.load(name)
    cal_text, eval_text, split = wikitext2_split(args.data, args.calibration_articles)
    data.update({"config": _config(args, split), "model": name, "rows": rows})

    def save(row=None):
        if row is not None:
            rows.append(row)
        write_json(out, data)

    tasks = list(args.tasks)
    if ("dense", None) not in done:
        log(f"{name}: dense")
        save({"model": name, "method": "dense", "target": None, "overall_sparsity": 0.0,
              "effective_sparsity": 0.0, **_evaluate(model, tok, eval_text, args, tasks, None)})
        log(f"{name}: dense ppl {rows[-1]['ppl']:.3f}")
    t0 = time.perf_counter()
    # with --resume, only the methods that still have rows to make are calibrated
    pending = [m for m in args.methods if any((m, t) not in done for t in args.targets)] or list(args.methods)
    bases = sorted({base_method(m)[0] for m in pending})
    cal = Calibrator(model, cal_text, tok, methods=bases, token_budget=args.calib_tokens,
                     batch_size=args.batch_size, seq_len=args.window, seed=args.seed, progress=False,
                     source=split["source"], cett_tokens=args.cett_tokens, greedy_step=args.greedy_step,
                     greedy_tokens=args.greedy_tokens, wina=any(base_method(m)[1] for m in pending))
    data["calibration_seconds"] = {"statistics": round(time.perf_counter() - t0, 1)}
    for label, wina in (("greedy", False), ("greedy_wina", True)):
        if any(base_method(m) == ("teal-greedy", wina) or (m in ("rsparse", "teal-greedy-seq") and not wina) for m in pending):
            t0 = time.perf_counter()
            greedy_for(cal, max(args.targets), wina=wina)
            data["calibration_seconds"][label] = round(time.perf_counter() - t0, 1)
    log(f"{name}: calibrated {data['calibration_seconds']}")
    total = sum(s.params for s in masked_sites(cal.sites))
    for target in args.targets:
        for method in args.methods:
            if (method, target) in done:
                continue
            t0 = time.perf_counter()
            base, wina = base_method(method)
            plan = cal.plan(base, target, wina=wina)
            observer = MaskObserver(total)
            torch._dynamo.reset()
            fwd = torch.compile(model, backend=ObservingBackend(plan, observer))
            row_tasks = tasks if _in(target, args.task_targets) else []
            row = {"model": name, "method": method, "target": target,
                   "overall_sparsity": plan.overall_sparsity, "plan_info": _plan_summary(plan),
                   **_evaluate(fwd, tok, eval_text, args, row_tasks, observer)}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            save(row)
            log(f"{name}: {method} @ {target}: ppl {row['ppl']:.3f}, effective sparsity "
                 f"{row['effective_sparsity']:.3f} (calibration {plan.overall_sparsity:.3f}), {row['seconds']} s"
                 + ("" if "second_text" not in row else
                    f"; {row['second_text']['name']}: ppl {row['second_text']['ppl']:.3f}, masked sparsity "
                    f"{row['second_text'].get('masked_sparsity', 0):.3f}"))
    torch._dynamo.reset()
    return data


def _in(x: float, xs) -> bool:
    return any(abs(x - y) < 1e-9 for y in xs)


def _plan_summary(plan) -> dict:
    keep = {k: v for k, v in plan.info.items() if k in ("tokens", "sequences", "seq_len", "target_scope")}
    if "cett" in plan.info:
        keep["cett_error_budget"] = round(plan.info["cett"]["error_budget"], 5)
        keep["cett_mean_error"] = round(plan.info["cett"]["mean_error"], 5)
    if "greedy" in plan.info:
        keep["greedy_evaluations"] = plan.info["greedy"]["evaluations"]
    if "rsparse" in plan.info:
        keep["rsparse"] = {k: plan.info["rsparse"][k] for k in ("base", "lowrank_fraction_of_dense", "mask_sparsity",
                                                              "ranked_linears")}
    return keep


def _config(args, split: dict) -> dict:
    return {
        "command": "python -m benchmarks.accuracy " + " ".join(sys.argv[1:]),
        "calibration_text": split["calibration"], "evaluation_text": split["evaluation"],
        "calibration_tokens": args.calib_tokens, "calibration_seq_len": args.window,
        "eval_tokens": args.eval_tokens, "window": args.window, "tasks": list(args.tasks),
        "task_limit": args.limit, "task_targets": list(args.task_targets), "task_seed": args.seed,
        "targets": list(args.targets), "methods": list(args.methods),
        "greedy_step": args.greedy_step, "greedy_tokens": args.greedy_tokens, "cett_tokens": args.cett_tokens,
        "second_text": (None if args.second_text == "none" else
                        {"name": args.second_text, "docs": args.second_docs, "seed": args.seed,
                         "tokens": args.second_tokens or args.eval_tokens,
                         "what": "LAMBADA (OpenAI) test contexts, a seeded subset joined by blank lines"}),
        "masked_sparsity": "masks applied by the compiled graph, parameter-weighted over the masked linears "
                           "only: the quantity the target names (for cats the MLP neuron sparsity)",
        "compiler": "actsparse backend, compiler='eager' (masked graph without Inductor)", "dtype": "float32",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "effective_sparsity": "masks applied by the compiled graph on the perplexity text, parameter-weighted "
                              "over every maskable decoder linear (LM head excluded; unmasked linears count 0)",
        "target_meaning": "teal, teal-greedy, stat-topk: sparsity of every masked linear input; cats, cett: "
                          "MLP neuron sparsity (up/down columns); cett: error budget searched to reach it; "
                          "+wina: the same with WINA scores |x_i| * ||W[:, i]||; teal-seq: as teal, each threshold "
                          "calibrated on the masked model's activations; rsparse: effective sparsity, the low-rank "
                          "factors' weights counted as read (effective sparsity column likewise)",
    }


# ---------------------------------------------------------------------------------- reports


def interpolate_ppl(rows: list[dict], method: str, at: float) -> float | None:
    """Perplexity of ``method`` at effective sparsity ``at``, linear in log ppl between the rows
    that bracket it; None if its rows do not reach ``at``."""
    pts = sorted((r["effective_sparsity"], r["ppl"]) for r in rows if r["method"] == method)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= at <= x1 and x1 > x0:
            w = (at - x0) / (x1 - x0)
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return None


def target_check(rows: list[dict], at: float = 0.5) -> dict | None:
    """Best method's perplexity increase over dense at ``at`` effective sparsity, against teal's."""
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    teal = interpolate_ppl(rows, "teal", at)
    if dense is None or teal is None:
        return None
    per = {m: interpolate_ppl(rows, m, at) for m in sorted({r["method"] for r in rows}) if m != "dense"}
    per = {m: p for m, p in per.items() if p is not None}
    best = min(per, key=per.get)
    ratio = (per[best] - dense) / (teal - dense) if teal > dense else float("nan")
    return {"at_effective_sparsity": at, "dense_ppl": dense, "ppl": {m: round(p, 3) for m, p in per.items()},
            "best_method": best, "increase_ratio_best_over_teal": round(ratio, 3), "met": bool(ratio <= 0.5)}


def predictor_file(out: Path, model: str) -> Path:
    """Where ``benchmarks.predictor`` writes ``model``'s rows: next to ``out``."""
    return out.with_name(f"predictor_{model}.json")


def load_predictor(out: Path, models) -> dict[str, dict]:
    """The predictor bench's per-model files next to ``out`` that exist, keyed by model.

    They hold the learned-predictor rows and the MLP bytes of the threshold methods, which the
    accuracy rows do not store (no per-module sparsities), so the table borrows them.
    """
    found = {}
    for model in models:
        path = predictor_file(out, model)
        if path.exists():
            found[model] = {**json.loads(path.read_text()), "file": "/".join(path.parts[-2:])}
    return found


def mlp_bytes(row: dict, pred: dict | None) -> tuple[float | None, str]:
    """(MLP weight bytes per token / dense, source) of an accuracy row, from the predictor bench's file.

    ``eval``: its row of the same method and target, measured on the same text (same perplexity,
    so the same plan); ``calib``: its bytes from the plan's calibration-measured sparsities; None
    where the file has neither (the row's per-module sparsities are stored nowhere).
    """
    if row["method"] == "dense":
        return 1.0, "eval"
    target = row.get("target")
    if not pred or target is None:
        return None, ""
    for r in pred.get("rows", []):
        if (r["method"] == row["method"] and r.get("target") is not None and _in(r["target"], [target])
                and math.isclose(r["ppl"], row["ppl"], rel_tol=1e-4)):
            return r["mlp_bytes"]["ratio"], "eval"
    for key, b in pred.get("bytes", {}).items():
        method, _, t = key.rpartition("@")
        if method == row["method"] and _in(float(t), [target]):
            return b["ratio"], "calib"
    return None, ""


def _bytes_cell(value: float | None, source: str) -> str:
    return "n/a" if value is None else f"{value:.3f}" + (" (cal.)" if source == "calib" else "")


def _bytes_note(rows: list[dict], pred: dict | None) -> str:
    missing = sorted({r["method"] for r in rows if mlp_bytes(r, pred)[0] is None})
    src = f"`{pred['file']}`" if pred else "the predictor bench's file (absent here)"
    note = ("MLP bytes / dense: MLP weight bytes (gate, up and down) read per token at batch 1 over the dense "
            "MLP's, as `mlp_bytes_per_token` in benchmarks.predictor counts them, taken from "
            f"{src}: measured from the masks on the same perplexity text where that file has the same row "
            "(same method, target and perplexity), else (cal.) from the plan's calibration-measured sparsities")
    if missing:
        note += (f"; n/a ({', '.join(missing)}): not derivable from stored data, since neither file stores "
                 "their per-module sparsities and the effective sparsity mixes attention and MLP")
    return note + "."


def _predictor_lines(pred: dict, tasks: list[str], dense: dict | None) -> list[str]:
    """The learned-predictor rows of the predictor bench's file, as their own table."""
    rows = sorted((r for r in pred.get("rows", []) if r["method"] == "predictor"), key=lambda r: r["target"])
    if not rows:
        return []
    pc, cfg = pred.get("predictor_config", {}), pred.get("config", {})
    added: dict[str, list[str]] = {}
    for r in rows:
        if r.get("tasks_added_by"):
            added.setdefault(r["tasks_added_by"], []).append(f"{r['target']:.2f}")
    rank = next((r["predictor"]["rank"] for r in rows if r.get("predictor")), "?")
    lines = ["", f"### Learned predictor (from `{pred['file']}`)", "",
             f"Rows of `{pred['file']}`, written by `{cfg.get('command', '')}`"
             + "".join(f"; tasks at {', '.join(ts)} added by `{c}`" for c, ts in added.items())
             + f". Predictor: rank {rank} ({pc.get('rank')} of d), labels `{pc.get('label')}` at sparsity "
             f"{pc.get('label_sparsity') or 'of each target'}, selection `{pc.get('selection')}`, "
             f"{pc.get('epochs')} epochs, {pc.get('train_tokens')} training tokens from the calibration articles, "
             f"{cfg.get('task_limit')} "
             "examples per task. Target: fraction of MLP neurons skipped (gate, up and down); effective "
             "sparsity weighted like the rows above; MLP bytes from the masks on the perplexity text, the "
             "predictor's own weights included; ppl increase over the dense row above.", "",
             "| method | target | effective sparsity (eval) | MLP bytes / dense | ppl | ppl increase | "
             + " | ".join(f"{t} acc" for t in tasks) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for r in rows:
        inc = "" if dense is None else f"{r['ppl'] - dense['ppl']:+.2f}"
        accs = [f"{r[t]['acc']:.3f}" if t in r else "" for t in tasks]
        lines.append(f"| predictor | {r['target']:.2f} | {r.get('effective_sparsity', 0):.3f} | "
                     f"{r['mlp_bytes']['ratio']:.3f} | {r['ppl']:.2f} | {inc} | " + " | ".join(accs) + " |")
    return lines


def _second_lines(rows: list[dict], dense: dict | None) -> list[str]:
    """The rows' achieved sparsity and perplexity on the second text, beside the target."""
    have = [r for r in rows if "second_text" in r]
    if not have:
        return []
    name = have[0]["second_text"]["name"]
    base = (dense or {}).get("second_text", {}).get("ppl")
    lines = ["", f"### Second text ({name}): achieved sparsity beside the target", "",
             "Masked sparsity: fraction of the masked linears' inputs the graph zeroed, parameter-weighted over "
             "those linears (the quantity the target names); drift: second text minus target.", "",
             "| method | target | masked sparsity (wikitext eval) | masked sparsity (" + name + ") | drift | "
             "ppl (" + name + ") | ppl increase |", "|---|---|---|---|---|---|---|"]
    for r in sorted(have, key=lambda r: (r["method"] != "dense", r["method"], r.get("target") or 0)):
        s = r["second_text"]
        tgt = r.get("target")
        inc = "" if base is None or r is dense else f"{s['ppl'] - base:+.2f}"
        ms = s.get("masked_sparsity")
        drift = "" if tgt is None or ms is None else f"{ms - tgt:+.3f}"
        lines.append(f"| {r['method']} | {'' if tgt is None else f'{tgt:.2f}'} | "
                     f"{'' if 'masked_sparsity' not in r else format(r['masked_sparsity'], '.3f')} | "
                     f"{'' if ms is None else format(ms, '.3f')} | {drift} | {s['ppl']:.2f} | {inc} |")
    return lines


def markdown(result: dict, predictor: dict[str, dict] | None = None) -> str:
    """The accuracy tables; ``predictor`` (model -> predictor bench file) adds bytes and predictor rows."""
    predictor = predictor or {}
    lines = ["# Accuracy of activation-sparsity methods (CPU, fp32)", ""]
    cfg = result.get("config", {})
    lines += [f"Command: `{cfg.get('command', '')}`", "",
              f"Calibration: {cfg.get('calibration_text')} ({cfg.get('calibration_tokens')} tokens, "
              f"sequences of {cfg.get('calibration_seq_len')}); perplexity: {cfg.get('evaluation_text')}, "
              f"first {cfg.get('eval_tokens')} tokens in windows of {cfg.get('window')}; tasks: "
              f"{', '.join(cfg.get('tasks', []))}, {cfg.get('task_limit')} examples each (seeded subset), "
              f"in every row that shows them. Evaluated through the actsparse backend "
              f"(compiler='eager'). Effective sparsity: {cfg.get('effective_sparsity')}. Target: "
              f"{cfg.get('target_meaning')}.", ""]
    for model, rows in result.get("models", {}).items():
        dense = next((r for r in rows if r["method"] == "dense"), None)
        pred = predictor.get(model)
        lines += [f"## {model}", "",
                  "| method | target | sparsity (calib.) | effective sparsity (eval) | MLP bytes / dense | ppl | "
                  "ppl increase | " + " | ".join(f"{t} acc" for t in cfg.get("tasks", [])) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(cfg.get("tasks", []))]
        for r in sorted(rows, key=lambda r: (r["method"] != "dense", r["method"], r.get("target") or 0)):
            inc = "" if dense is None or r is dense else f"{r['ppl'] - dense['ppl']:+.2f}"
            accs = [f"{r[t]['acc']:.3f}" if t in r else "" for t in cfg.get("tasks", [])]
            tgt = "" if r.get("target") is None else f"{r['target']:.2f}"
            lines.append(f"| {r['method']} | {tgt} | {r.get('overall_sparsity', 0):.3f} | "
                         f"{r.get('effective_sparsity', 0):.3f} | {_bytes_cell(*mlp_bytes(r, pred))} | "
                         f"{r['ppl']:.2f} | {inc} | " + " | ".join(accs) + " |")
        lines += ["", _bytes_note(rows, pred)]
        chk = result.get("target_check", {}).get(model)
        if chk:
            lines += ["", f"At {chk['at_effective_sparsity']:.0%} effective sparsity (log-linear between rows): "
                      + ", ".join(f"{m} {p:.2f}" for m, p in chk["ppl"].items())
                      + f"; dense {chk['dense_ppl']:.2f}. Best: {chk['best_method']}, its increase is "
                      f"{chk['increase_ratio_best_over_teal']:.2f} of teal's "
                      f"(target <= 0.5: {'met' if chk['met'] else 'not met'})."]
        lines += _second_lines(rows, dense)
        if pred:
            lines += _predictor_lines(pred, list(cfg.get("tasks", [])), dense)
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path, predictor: dict[str, dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result.get("models", {}))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = result["models"][model]
        for method in sorted({r["method"] for r in rows if r["method"] != "dense"}):
            pts = sorted((r["effective_sparsity"], r["ppl"]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        pred = (predictor or {}).get(model, {})
        pts = sorted((r["effective_sparsity"], r["ppl"]) for r in pred.get("rows", []) if r["method"] == "predictor")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="x", linestyle="--",
                    label=f"predictor ({pred['file'].rpartition('/')[2]})")
        dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
        if dense is not None:
            ax.axhline(dense, color="k", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("effective sparsity on the evaluation text")
        ax.set_ylabel("WikiText-2 perplexity (held-out articles)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(per_model: dict[str, dict], out: Path) -> dict:
    """The combined result, its markdown table and its plot, written next to ``out``."""
    first = next(iter(per_model.values()), {})
    config = dict(first.get("config", {}))
    config["command"] = "python -m benchmarks.accuracy " + " ".join(sys.argv[1:])  # this (parent) process
    config["rows_note"] = ("rows are kept across --resume runs: each per-model file records the command "
                           "of its last run; rows made earlier keep their own settings, which match; "
                           "task fields added later by --add-tasks name that command in tasks_added_by")
    result = {"config": config,
              "models": {m: d.get("rows", []) for m, d in per_model.items()},
              "calibration_seconds": {m: d.get("calibration_seconds") for m, d in per_model.items()}}
    result["target_check"] = {m: target_check(rows) for m, rows in result["models"].items()}
    write_json(out, result)
    render(result, out)
    return result


def render(result: dict, out: Path) -> None:
    """The markdown table and the plot of ``result`` next to ``out``, with the predictor bench's files."""
    predictor = load_predictor(out, result.get("models", {}))
    out.with_suffix(".md").write_text(markdown(result, predictor))
    plot(result, out.with_suffix(".png"), predictor)


# ---------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    from actsparse.calibration import METHODS

    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    add("--methods", nargs="+", default=list(METHODS) + list(WINA_METHODS),
        choices=list(METHODS) + list(WINA_METHODS))
    add("--targets", nargs="+", type=float, default=list(TARGETS))
    add("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    add("--task-targets", nargs="*", type=float, default=[0.5],
        help="targets at which the zero-shot tasks run (dense always); default %(default)s")
    add("--limit", type=int, default=100, help="examples per task (default: %(default)s)")
    add("--eval-tokens", type=int, default=4096, help="perplexity tokens scored (default: %(default)s)")
    add("--window", type=int, default=512, help="perplexity window and calibration sequence length")
    add("--calib-tokens", type=int, default=4096, help="calibration token budget (default: %(default)s)")
    add("--calibration-articles", type=int, default=10)
    add("--greedy-step", type=float, default=0.02)
    add("--greedy-tokens", type=int, default=256)
    add("--cett-tokens", type=int, default=256)
    add("--batch-size", type=int, default=4)
    add("--seed", type=int, default=0)
    add("--second-text", default="none", choices=["none", "lambada"],
        help="also measure perplexity and achieved sparsity on a text of another domain (default: %(default)s)")
    add("--second-docs", type=int, default=300, help="LAMBADA contexts drawn for --second-text")
    add("--second-tokens", type=int, default=None,
        help="tokens scored on the second text (default: --eval-tokens)")
    add("--data", default=None, metavar="DIR", help="data directory (default: $ACTSPARSE_DATA)")
    add("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    add("--jobs", type=int, default=2, help="models evaluated in parallel processes (default: %(default)s)")
    add("--resume", action="store_true", help="keep the rows already in the per-model files")
    add("--add-tasks", action="store_true",
        help="only evaluate the tasks for existing rows of --methods at --task-targets that lack them")
    add("--render", action="store_true",
        help="evaluate nothing: re-render the markdown and plot of --out (and the predictor files next to it)")
    add("--out", default="benchmarks/results/accuracy.json")
    return p


def _model_out(out: Path, model: str) -> Path:
    return out.with_name(f"{out.stem}_{model}.json")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.render:
        render(json.loads(out.read_text()), out)
        log(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.png')}")
        return 0
    if len(args.models) > 1 and args.jobs > 1:
        argv = list(sys.argv[1:] if argv is None else argv)
        procs = []
        for model in args.models:
            sub = _strip(argv, "--models", "--out", "--jobs") + ["--models", model, "--jobs", "1",
                                                                  "--out", str(_model_out(out, model))]
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.accuracy", *sub]))
            # the per-model process writes <out>_<model>.json; the merge below reads them
        codes = [p.wait() for p in procs]
        if any(codes):
            log(f"model processes exited with {codes}; merging what was written")
    else:
        for model in args.models:
            target = out if len(args.models) == 1 and out.stem.endswith(model) else _model_out(out, model)
            (add_tasks if args.add_tasks else run_model)(model, args, target)
    if len(args.models) == 1 and out.stem.endswith(args.models[0]):
        return 0  # a per-model process of a parallel run: the parent merges
    per_model = {m: json.loads(_model_out(out, m).read_text()) for m in args.models if _model_out(out, m).exists()}
    res = merge(per_model, out)
    log(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    for m, chk in res["target_check"].items():
        log(f"{m}: target check {chk}")
    return 0


def _strip(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without the given options and their values."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = False
        if a.split("=")[0] in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
