"""Accuracy of attention-head routing (Polar Sparsity), alone and on top of linear-input plans.

    python -m benchmarks.accuracy_heads --data ../shared/data --models smollm2-135m gemma3-270m \\
        --out benchmarks/results/accuracy_heads.json

Same protocol as ``benchmarks.accuracy``: calibration on WikiText-2 test articles 0-9,
perplexity on the first 4096 tokens of articles 10+ in windows of 512, zero-shot tasks (piqa,
arc_easy, winogrande) on 60 seeded examples each. Every plan is evaluated eagerly with
``actsparse.eval.masked(model, plan)`` (module hooks, no compilation).

Rows per model: dense; head routing alone (method ``polar``, greedy allocation) at each
``--densities``; the ``teal-greedy`` linear-input plan at each ``--linear-targets`` alone and
combined with routers at every density below 1. Routers are trained once per density on the
dense model (``actsparse.calibrate(model, text, "polar", head_density=d, head_tokens=8192)``)
and the combined rows add those same routers to the linear plan, which is what
``calibrate(model, text, "teal-greedy", s, head_density=d)`` does (its routers are also trained
on the dense model, with the same data, seed and budget), without training them once per plan.

The JSON is written after every row, so a stopped run keeps its rows; ``--resume`` skips rows
already there and, with tasks on, adds the tasks that rows made with ``--no-tasks`` lack.
``--render`` only re-writes the markdown and the plot from the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

from benchmarks.accuracy import TASKS, _evaluate, _evaluate_tasks
from benchmarks.harness import command_line, log, write_json

MODULE = "benchmarks.accuracy_heads"
LINEAR_METHOD = "teal-greedy"
DENSITIES = (1.0, 0.75, 0.5, 0.3)
LINEAR_TARGETS = (0.4, 0.5)
#: The target: heads at this density plus this linear plan, ppl within this ratio of the plan alone.
TARGET = {"linear_target": 0.4, "head_density": 0.5, "max_ratio": 1.05}
TARGET_TEXT = ("at head density 0.5 plus the 40% linear-input plan, perplexity within 5% of that plan alone "
               "on both models; otherwise report the density where it holds")
#: Settings that change a row's numbers: --resume refuses a file made with other values.
PROTOCOL = ("eval_tokens", "window", "calib_tokens", "head_tokens", "calibration_articles", "greedy_step",
            "greedy_tokens", "seed", "allocation", "error", "unit", "linear_method")


# ---------------------------------------------------------------------------------- rows (pure)


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def row_key(row: dict) -> tuple[float | None, float | None]:
    """(linear target, head density target) of a row; None: no linear plan / no head routers."""
    return _r(row.get("linear_target")), _r(row.get("head_density"))


def wanted_keys(densities, linear_targets) -> list[tuple[float | None, float | None]]:
    """The rows of one model, in the order they are made."""
    dens = sorted({_r(d) for d in densities}, reverse=True)
    keys = [(None, None)] + [(None, d) for d in dens]
    for t in sorted({_r(t) for t in linear_targets}):
        keys += [(t, None)] + [(t, d) for d in dens if d < 1.0]
    return keys


def label(key: tuple[float | None, float | None]) -> str:
    lin, dens = key
    parts = [] if lin is None else [f"{LINEAR_METHOD} {lin:.0%}"]
    if dens is not None:
        parts.append(f"heads {dens:.2f}")
    return " + ".join(parts) or "dense"


def achieved_density(row: dict) -> float:
    """Mean fraction of attention units kept per token (1.0 without head routers)."""
    return row["heads"]["density"] if row.get("heads") else 1.0


def find(rows: list[dict], key) -> dict | None:
    return next((r for r in rows if row_key(r) == key), None)


def annotate(rows: list[dict]) -> None:
    """Add each row's perplexity increase over dense and, for combined rows, its ratio to the
    same linear plan without head routers (in place; None where the reference row is missing)."""
    dense = find(rows, (None, None))
    for r in rows:
        lin, dens = row_key(r)
        r["ppl_increase"] = None if dense is None else round(r["ppl"] - dense["ppl"], 4)
        r["ppl_ratio_vs_dense"] = None if dense is None else round(r["ppl"] / dense["ppl"], 4)
        base = find(rows, (lin, None)) if dens is not None else None
        r["ppl_ratio_vs_linear"] = None if base is None or lin is None else round(r["ppl"] / base["ppl"], 4)


def target_check(rows: list[dict], linear_target: float = TARGET["linear_target"],
                 head_density: float = TARGET["head_density"], max_ratio: float = TARGET["max_ratio"]) -> dict:
    """Whether ``linear_target`` plus heads at ``head_density`` keeps perplexity within ``max_ratio``
    of the linear plan alone; where not, the lowest measured density at which it holds (for that
    density and every measured one above it) and a log-linear estimate of the crossing."""
    lin = _r(linear_target)
    base = find(rows, (lin, None))
    combined = sorted((r for r in rows if row_key(r)[0] == lin and row_key(r)[1] is not None),
                      key=lambda r: -row_key(r)[1])
    out = {"linear_method": LINEAR_METHOD, "linear_target": lin, "head_density": _r(head_density),
           "max_ratio": max_ratio, "linear_ppl": None if base is None else base["ppl"], "ratios": {},
           "ratio": None, "met": None, "holds_at": None, "holds_at_achieved": None, "crossing_estimate": None}
    if base is None:
        return out
    pts = [(row_key(r)[1], achieved_density(r), r["ppl"] / base["ppl"]) for r in combined]
    out["ratios"] = {f"{d:.2f}": round(q, 4) for d, _, q in pts}
    at = next((q for d, _, q in pts if d == _r(head_density)), None)
    if at is not None:
        out["ratio"], out["met"] = round(at, 4), bool(at <= max_ratio)
    hi = (1.0, 1.0)  # (achieved density, ratio): the plan alone
    for d, a, q in pts:
        if q > max_ratio:
            if hi[1] <= max_ratio and q > hi[1] and a < hi[0]:
                w = (math.log(max_ratio) - math.log(hi[1])) / (math.log(q) - math.log(hi[1]))
                out["crossing_estimate"] = round(hi[0] + w * (a - hi[0]), 3)
            break
        out["holds_at"], out["holds_at_achieved"] = d, round(a, 4)
        hi = (a, q)
    return out


def overall(checks: dict[str, dict]) -> dict:
    """The target over every model: met only if it is met on each."""
    mets = [c.get("met") for c in checks.values()]
    return {"models": sorted(checks), "met": bool(mets) and all(m is True for m in mets),
            "complete": bool(mets) and all(m is not None for m in mets)}


def finish(data: dict) -> dict:
    """Derived fields of a result (row ratios, target checks), recomputed from the rows."""
    for m in data.get("models", {}).values():
        annotate(m["rows"])
    data["target"] = {"text": TARGET_TEXT, **TARGET}
    data["target_check"] = {name: target_check(m["rows"]) for name, m in data.get("models", {}).items()}
    data["target_overall"] = overall(data["target_check"])
    return data


# ---------------------------------------------------------------------------------- plans


def heads_summary(info: dict) -> dict:
    """What a row keeps of ``plan.info["heads"]``: layout, per-layer keep counts, router quality."""
    layers = list(info["layers"].values())
    n = max(1, len(layers))
    return {"unit": info["unit"], "units": info["units"], "heads_per_unit": info["heads_per_unit"],
            "allocation": info["allocation"], "tokens": info["tokens"], "target_density": info["target_density"],
            "density": round(info["density"], 4), "keep": [lay["keep"] for lay in layers],
            "dense_layers": sum(lay["keep"] >= info["units"] for lay in layers),
            "recall_k": max(1, int(round(info["target_density"] * info["units"]))),
            "recall": round(sum(lay["recall_at_target"] for lay in layers) / n, 4),
            "error": round(sum(lay["error"] for lay in layers) / n, 5),
            "oracle_error": round(sum(lay["oracle_error"] for lay in layers) / n, 5)}


def plan_hash(plan) -> str:
    """A digest of what a plan applies (its non-empty rules and their tensors)."""
    rules = {k: r.to_json() for k, r in sorted(plan.rules.items()) if not r.is_empty()}
    h = hashlib.sha256(json.dumps(rules, sort_keys=True, default=str).encode())
    for k, t in sorted(plan.tensors().items()):
        h.update(k.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Plans:
    """The plans of one model, calibrated when first asked for (so --resume calibrates only what it needs)."""

    def __init__(self, model, tokenizer, cal_text: str, split: dict, args, seconds: dict) -> None:
        self.model, self.tok, self.text, self.split, self.args, self.seconds = \
            model, tokenizer, cal_text, split, args, seconds
        self.cal = None
        self._heads: dict[float, object] = {}
        self._linear: dict[float, object] = {}

    def heads(self, density: float):
        if density not in self._heads:
            import actsparse

            a = self.args
            t0 = time.perf_counter()
            self._heads[density] = actsparse.calibrate(
                self.model, self.text, "polar", tokenizer=self.tok, head_density=density,
                head_tokens=a.head_tokens, seq_len=a.window, batch_size=a.batch_size, seed=a.seed,
                progress=False, allocation=a.allocation, error=a.error, unit=a.unit)
            self.seconds[f"heads_{density:.2f}"] = round(time.perf_counter() - t0, 1)
            log(f"  routers at head density {density:.2f}: {self.seconds[f'heads_{density:.2f}']} s")
        return self._heads[density]

    def linear(self, target: float):
        if target not in self._linear:
            from actsparse.calibration import Calibrator
            from actsparse.calibration.greedy import greedy_for

            a = self.args
            if self.cal is None:
                t0 = time.perf_counter()
                self.cal = Calibrator(self.model, self.text, self.tok, methods=[LINEAR_METHOD],
                                      token_budget=a.calib_tokens, batch_size=a.batch_size, seq_len=a.window,
                                      seed=a.seed, progress=False, source=self.split["source"],
                                      greedy_step=a.greedy_step, greedy_tokens=a.greedy_tokens)
                self.seconds["statistics"] = round(time.perf_counter() - t0, 1)
                t0 = time.perf_counter()
                greedy_for(self.cal, max(a.linear_targets))  # one greedy path serves every target
                self.seconds["greedy"] = round(time.perf_counter() - t0, 1)
                log(f"  {LINEAR_METHOD} calibration: {self.seconds['statistics']} s statistics, "
                    f"{self.seconds['greedy']} s greedy path")
            self._linear[target] = self.cal.plan(LINEAR_METHOD, target)
        return self._linear[target]

    def get(self, key):
        """The plan of a row (None: dense)."""
        from actsparse import SparsityPlan
        from actsparse.plan import HeadRouting

        lin, dens = key
        if lin is None:
            return None if dens is None else self.heads(dens)
        base = self.linear(lin)
        if dens is None:
            return base
        plan = SparsityPlan.from_dict(base.to_dict(), base.tensors())  # a copy: the base row stays as it is
        routed = self.heads(dens)
        plan.add(routed.rule(HeadRouting))
        plan.info["heads"] = routed.info["heads"]
        plan.validate(self.model)
        return plan


# ---------------------------------------------------------------------------------- running


def _config(args, split: dict | None = None) -> dict:
    import torch

    cfg = {k: getattr(args, k) for k in PROTOCOL}
    cfg.update({"densities": list(args.densities), "linear_targets": list(args.linear_targets),
                "tasks": list(TASKS), "task_limit": args.limit, "task_seed": args.seed,
                "batch_size": args.batch_size, "threads": args.threads, "torch": torch.__version__,
                "machine": platform.machine(), "dtype": "float32",
                "evaluation": "actsparse.eval.masked(model, plan): the plan applied eagerly with hooks",
                "routers": "actsparse.calibrate(model, calibration text, 'polar', head_density=d, "
                           "head_tokens=head_tokens): trained once per density on the dense model; combined "
                           "rows add the same routers to the linear plan"})
    if split is not None:
        cfg.update({"calibration_text": split["calibration"], "evaluation_text": split["evaluation"]})
    return cfg


def check_resume(data: dict, args) -> None:
    """Refuse to add rows to a file made with other settings (its rows would not compare)."""
    cfg = data.get("config", {})
    diff = [f"--{k.replace('_', '-')} {getattr(args, k)} (the file has {cfg[k]})" for k in PROTOCOL
            if k in cfg and cfg[k] != getattr(args, k)]
    has_tasks = any(t in r for m in data.get("models", {}).values() for r in m.get("rows", []) for t in TASKS)
    if has_tasks and args.tasks and cfg.get("task_limit") not in (None, args.limit):
        diff.append(f"--limit {args.limit} (the file's tasks used {cfg['task_limit']})")
    if diff:
        raise SystemExit(f"--resume: {args.out} was made with other settings: {'; '.join(diff)}")


def todo(rows: list[dict], keys, tasks: bool) -> list:
    """Keys whose row is missing, or (with tasks) lacks some task."""
    return [k for k in keys if find(rows, k) is None or (tasks and not all(t in find(rows, k) for t in TASKS))]


def run_model(name: str, args, data: dict, save) -> None:
    import torch

    from actsparse import models
    from actsparse.calibration import wikitext2_split
    from actsparse.calibration.heads import head_layout
    from actsparse.eval import masked

    entry = data["models"].setdefault(name, {"rows": [], "calibration_seconds": {}})
    rows = entry["rows"]
    keys = todo(rows, wanted_keys(args.densities, args.linear_targets), args.tasks)
    if not keys:
        log(f"{name}: nothing to do")
        return
    t_model = time.perf_counter()
    model, tok = models.load(name)
    hq, hkv, hd = head_layout(model)
    entry["layout"] = {"num_heads": hq, "num_kv_heads": hkv, "head_dim": hd,
                       "layers": model.config.get_text_config().num_hidden_layers}
    cal_text, eval_text, split = wikitext2_split(args.data, args.calibration_articles)
    data["config"].update({k: v for k, v in _config(args, split).items()
                           if k != "task_limit" or args.tasks or k not in data["config"]})
    plans = Plans(model, tok, cal_text, split, args, entry.setdefault("calibration_seconds", {}))
    tasks = list(TASKS) if args.tasks else []
    for key in keys:
        t0 = time.perf_counter()
        log(f"{name}: {label(key)}")
        plan = plans.get(key)
        h = None if plan is None else plan_hash(plan)
        ctx = contextlib.nullcontext(model) if plan is None else masked(model, plan)
        row = find(rows, key)
        with ctx as fwd:
            if row is None:
                row = {"model": name, "label": label(key), "linear_method": None if key[0] is None else LINEAR_METHOD,
                       "linear_target": key[0], "head_density": key[1],
                       "linear_sparsity": 0.0 if key[0] is None else plan.overall_sparsity,
                       "heads": None if key[1] is None else heads_summary(plan.info["heads"]),
                       "plan_hash": h, "made_by": args.command,
                       **_evaluate(fwd, tok, eval_text, args, tasks, None)}
                rows.append(row)
            else:
                missing = [t for t in tasks if t not in row]
                row.update(_evaluate_tasks(fwd, tok, args, missing))
                row["tasks_added_by"] = args.command
                if row.get("plan_hash") != h:  # the plan was not made again identically
                    row["tasks_plan_hash"] = h
                    log(f"{name}: WARNING {label(key)}: the tasks' plan {h} differs from the perplexity's "
                        f"{row.get('plan_hash')}")
        row["seconds"] = round(row.get("seconds", 0.0) + time.perf_counter() - t0, 1)
        save()
        accs = ", ".join(f"{t} {row[t]['acc']:.3f}" for t in TASKS if t in row)
        dens = f", head density {achieved_density(row):.3f}" if row.get("heads") else ""
        log(f"{name}: {label(key)}: ppl {row['ppl']:.3f}{dens}{'; ' + accs if accs else ''} "
            f"({time.perf_counter() - t0:.0f} s)")
    entry["seconds"] = round(entry.get("seconds", 0.0) + time.perf_counter() - t_model, 1)
    save()
    del plans, model
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------- reports


def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _order(rows: list[dict]) -> list[dict]:
    def k(r):
        lin, dens = row_key(r)
        return (-1 if lin is None else lin, dens is not None, -(dens or 0))
    return sorted(rows, key=k)


def _check_line(model: str, chk: dict) -> str:
    lin, dens, q = chk["linear_target"], chk["head_density"], chk["max_ratio"]
    if chk["linear_ppl"] is None:
        return f"- {model}: no {LINEAR_METHOD} {lin:.0%} row yet."
    s = f"- {model}: {LINEAR_METHOD} {lin:.0%} alone {chk['linear_ppl']:.2f}; "
    s += ", ".join(f"heads {d}: x{r:.3f}" for d, r in chk["ratios"].items()) + ". "
    if chk["met"] is None:
        s += f"No row at head density {dens:.2f} yet."
    else:
        s += (f"At head density {dens:.2f}: ratio {chk['ratio']:.3f} -> "
              f"{'met' if chk['met'] else 'not met'} (limit {q:.2f}).")
    if not chk["met"]:
        if chk["holds_at"] is None:
            s += " Holds at no measured head density below 1.0"
        else:
            s += (f" Holds down to head density {chk['holds_at']:.2f} (achieved {chk['holds_at_achieved']:.3f}; "
                  "every measured density from there up)")
        if chk["crossing_estimate"] is not None:
            s += f"; log-linear estimate of where the ratio reaches {q:.2f}: density ~{chk['crossing_estimate']:.2f}"
        s += "."
    return s


def _accuracy_cross_check(out: Path) -> dict[str, dict[float, float]]:
    """teal-greedy perplexities of ``accuracy.json`` next to ``out`` (compiled backend), by model and target."""
    path = out.with_name("accuracy.json")
    if not path.exists():
        return {}
    try:
        res = json.loads(path.read_text())
        return {m: {round(r["target"], 6): r["ppl"] for r in rows if r["method"] == LINEAR_METHOD}
                for m, rows in res.get("models", {}).items()}
    except (ValueError, KeyError, TypeError):
        return {}


def markdown(result: dict, cross: dict | None = None) -> str:
    """The tables of a result (``finish``ed): one per model, the target check, the commands."""
    cfg = result.get("config", {})
    cross = cross or {}
    tasks = list(cfg.get("tasks", TASKS))
    lines = ["# Accuracy of attention-head routing (Polar Sparsity), alone and with linear-input plans (CPU, fp32)",
             "", "Commands (in order; `--resume` runs add rows or tasks to the same file):", ""]
    lines += [f"- `{c}`" for c in result.get("commands", [])]
    lines += ["", f"Protocol: calibration on {cfg.get('calibration_text')} (linear plans: {cfg.get('calib_tokens')} "
              f"tokens; routers: {cfg.get('head_tokens')} tokens, 20% of them held out), sequences of "
              f"{cfg.get('window')}; perplexity on {cfg.get('evaluation_text')}, first {cfg.get('eval_tokens')} "
              f"tokens in windows of {cfg.get('window')}; tasks {', '.join(tasks)} on {cfg.get('task_limit')} "
              f"seeded examples each (seed {cfg.get('task_seed')}), where a row shows them. Every plan is applied "
              "eagerly with `actsparse.eval.masked(model, plan)` (hooks, no compilation). Linear plans: "
              f"`{cfg.get('linear_method')}` (greedy step {cfg.get('greedy_step')}, {cfg.get('greedy_tokens')} "
              f"block-error tokens). Head routers: method `polar`, `{cfg.get('allocation')}` allocation; "
              f"{cfg.get('routers')}.", "",
              "Columns. *head density*: target / achieved mean fraction of attention units kept per token over "
              "all layers (the greedy allocation keeps the budget floor(target x units x layers), but every "
              "layer keeps at least one unit, so the lowest reachable density is 1 / units). *ppl / dense*, "
              "*ppl / linear*: perplexity over the dense row's, and over the same linear plan without heads. "
              "*recall*: router's held-out recall of the oracle's top-k units (by contribution to the block "
              "output), k = round(target density x units) in every layer (as `calibration.heads` measures it, "
              "not the allocated keep), mean over layers. *error*: held-out relative L2 norm of the dropped "
              "units' contribution to the attention output at the allocated keep, mean over layers (a layer "
              "keeping every unit counts 0); *oracle*: the same with the oracle's selection.", "",
              f"Target (issue): {TARGET_TEXT}.", ""]
    for model, chk in result.get("target_check", {}).items():
        lines.append(_check_line(model, chk))
    tot = result.get("target_overall", {})
    if tot:
        lines += ["", f"**Target {'met' if tot['met'] else 'not met'}"
                  + ("" if tot.get("complete") else " (not every model has the rows yet)") + "** (computed from the rows)."]
    for model, entry in result.get("models", {}).items():
        rows = _order(entry["rows"])
        lay = entry.get("layout", {})
        lines += ["", f"## {model}", ""]
        if lay:
            lines.append(f"{lay.get('layers')} layers, {lay['num_heads']} query heads, {lay['num_kv_heads']} KV "
                         f"head{'s' if lay['num_kv_heads'] > 1 else ''} of {lay['head_dim']}.")
        unit = next((r["heads"] for r in rows if r.get("heads")), None)
        if unit:
            what = ("whole KV groups" if unit["unit"] == "group" else "single query heads")
            lines[-1] += f" Routing units: {what}, {unit['units']} per layer ({unit['heads_per_unit']} query head(s) each)."
        if lay and lay.get("num_kv_heads") == 1:
            lines += ["", f"Note: {model} has a single KV head, so only single query heads can be routed; every "
                      "kept head still reads the whole (shared) K/V cache, so head routing here saves attention "
                      "compute and o_proj columns but no KV-cache bytes. KV-group routing, which skips the K/V "
                      "rows of dropped groups, cannot save KV bytes on this model."]
        lines += ["", "| row | linear sparsity (calib.) | head density (target / achieved) | ppl | ppl increase "
                  "| ppl / dense | ppl / linear | " + " | ".join(f"{t} acc" for t in tasks)
                  + " | recall (k) | error (oracle) |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|"]
        for r in rows:
            hs = r.get("heads")
            dens = "" if r.get("head_density") is None else f"{r['head_density']:.2f} / {hs['density']:.3f}"
            accs = [f"{r[t]['acc']:.3f}" if t in r else "" for t in tasks]
            router = ("", "") if not hs else (f"{hs['recall']:.3f} ({hs['recall_k']})",
                                               f"{hs['error']:.4f} ({hs['oracle_error']:.4f})")
            inc = r.get("ppl_increase")
            lines.append(f"| {r['label']} | {r.get('linear_sparsity', 0):.3f} | {dens} | {r['ppl']:.2f} | "
                         f"{'' if inc is None or r['label'] == 'dense' else f'{inc:+.2f}'} | "
                         f"{_f(r.get('ppl_ratio_vs_dense'), '.3f')} | {_f(r.get('ppl_ratio_vs_linear'), '.3f')} | "
                         + " | ".join(accs) + f" | {router[0]} | {router[1]} |")
        keeps = {}
        for r in rows:
            if r.get("heads") and r["head_density"] not in keeps:
                keeps[r["head_density"]] = r["heads"]
        if keeps:
            lines += ["", "Units kept per layer (layer 0 first; the same routers serve the rows of one density):", ""]
            for d in sorted(keeps, reverse=True):
                hs = keeps[d]
                lines.append(f"- {d:.2f} (achieved {hs['density']:.3f}, {hs['dense_layers']} of {len(hs['keep'])} "
                             f"layers dense): {' '.join(map(str, hs['keep']))}")
        ref = cross.get(model, {})
        pairs = [(r["linear_target"], r["ppl"], ref[_r(r["linear_target"])]) for r in rows
                 if r.get("linear_target") is not None and r.get("head_density") is None and _r(r["linear_target"]) in ref]
        if pairs:
            lines += ["", "Cross-check: " + "; ".join(
                f"{LINEAR_METHOD} {t:.0%} here (masked hooks) {p:.2f}, in accuracy.json (compiled backend) {q:.2f}"
                for t, p, q in pairs) + "."]
        secs = entry.get("calibration_seconds")
        if secs:
            lines += ["", "Calibration seconds: " + ", ".join(f"{k} {v}" for k, v in secs.items())
                      + (f"; model total {entry['seconds']} s" if entry.get("seconds") else "") + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Perplexity against achieved head density, one line per linear plan (none, teal-greedy at each target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result.get("models", {}))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = result["models"][model]["rows"]
        for lin in sorted({row_key(r)[0] for r in rows}, key=lambda x: -1 if x is None else x):
            pts = sorted((achieved_density(r), r["ppl"]) for r in rows
                         if row_key(r)[0] == lin and (lin is not None or r.get("heads")))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label="heads only" if lin is None else f"{LINEAR_METHOD} {lin:.0%} + heads")
        dense = find(rows, (None, None))
        if dense is not None:
            ax.axhline(dense["ppl"], color="k", linestyle="--", linewidth=1, label=f"dense ({dense['ppl']:.1f})")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("mean head density (fraction of attention units kept per token)")
        ax.set_ylabel("WikiText-2 perplexity (held-out articles)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict, out: Path) -> None:
    out.with_suffix(".md").write_text(markdown(result, _accuracy_cross_check(out)))
    plot(result, out.with_suffix(".png"))


# ---------------------------------------------------------------------------------- command


def _density(s: str) -> float:
    x = float(s)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"a head density is in (0, 1], got {s}")
    return x


def _sparsity(s: str) -> float:
    x = float(s)
    if not 0.0 < x < 1.0:
        raise argparse.ArgumentTypeError(f"a linear-plan target is in (0, 1), got {s}")
    return x


def _positive(s: str) -> int:
    x = int(s)
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {s}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    add("--densities", nargs="+", type=_density, default=list(DENSITIES),
        help="head densities (alone; below 1 also with each linear plan); default %(default)s")
    add("--linear-targets", nargs="+", type=_sparsity, default=list(LINEAR_TARGETS),
        help=f"{LINEAR_METHOD} targets; default %(default)s")
    add("--tasks", action=argparse.BooleanOptionalAction, default=True,
        help=f"evaluate the zero-shot tasks ({', '.join(TASKS)}) in every row (default: on)")
    add("--limit", type=_positive, default=60, help="examples per task (default: %(default)s)")
    add("--eval-tokens", type=_positive, default=4096, help="perplexity tokens scored (default: %(default)s)")
    add("--window", type=_positive, default=512, help="perplexity window and calibration sequence length")
    add("--calib-tokens", type=_positive, default=4096, help="linear-plan calibration tokens (default: %(default)s)")
    add("--head-tokens", type=_positive, default=8192, help="router calibration tokens (default: %(default)s)")
    add("--allocation", choices=("greedy", "uniform"), default="greedy", help="units per layer (default: greedy)")
    add("--error", choices=("residual", "attention"), default="residual",
        help="what the greedy allocation weighs (default: %(default)s)")
    add("--unit", choices=("group", "head"), default=None,
        help="routing unit: whole KV groups or single heads (default: groups where there are several KV heads)")
    add("--calibration-articles", type=_positive, default=10)
    add("--greedy-step", type=float, default=0.02)
    add("--greedy-tokens", type=_positive, default=256)
    add("--batch-size", type=_positive, default=4)
    add("--seed", type=int, default=0)
    add("--threads", type=_positive, default=1, help="torch threads (default: %(default)s)")
    add("--data", default=None, metavar="DIR", help="data directory (default: $ACTSPARSE_DATA)")
    add("--resume", action="store_true", help="keep the rows in --out; make only the missing rows and tasks")
    add("--render", action="store_true", help="evaluate nothing: re-render the markdown and plot of --out")
    add("--out", default="benchmarks/results/accuracy_heads.json")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        if not out.exists():
            parser.error(f"--render: {out} does not exist")
        render(finish(json.loads(out.read_text())), out)
        log(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.png')}")
        return 0
    args.linear_method = LINEAR_METHOD
    args.command = command_line(MODULE, sys.argv[1:] if argv is None else argv)
    data = {}
    if args.resume and out.exists():
        data = json.loads(out.read_text())
        check_resume(data, args)
    data.setdefault("models", {})
    data.setdefault("commands", []).append(args.command)
    cfg = _config(args)
    if not args.tasks and "task_limit" in data.get("config", {}):
        cfg["task_limit"] = data["config"]["task_limit"]  # this run evaluates no tasks: the file's stay as made
    data.setdefault("config", {}).update(cfg)
    data["command"] = data["commands"][0]
    data["date"] = time.strftime("%Y-%m-%d %H:%M")

    import torch

    torch.set_num_threads(args.threads)

    def save():
        write_json(out, finish(data))

    t0 = time.perf_counter()
    for name in args.models:
        run_model(name, args, data, save)
        render(finish(data), out)
    data["seconds_last_run"] = round(time.perf_counter() - t0, 1)
    save()
    render(data, out)
    log(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} ({data['seconds_last_run']} s)")
    for name, chk in data["target_check"].items():
        log(_check_line(name, chk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
