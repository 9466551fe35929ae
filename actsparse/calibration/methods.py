"""``calibrate``: turn calibration text into a SparsityPlan with one of five methods.

* ``teal``: per linear input, the |x| quantile at the target (uniform sparsity).
* ``teal-greedy``: TEAL's per-block greedy allocation of the same target (greedy.py).
* ``cats``: per MLP, the |act(gate)| quantile at the target (cats.py).
* ``cett``: per MLP, the largest |act(gate)| threshold within an output-error budget (cett.py).
* ``stat-topk``: statistical top-k, no calibration; the data only measures it (stat_topk.py).

``wina=True`` (teal, teal-greedy) scores each input channel by ``|x_i| * ||W[:, i]||`` (WINA)
instead of ``|x_i|``: each linear gets its own threshold on that score, and the plan's
``score`` is ``"wina"`` so the backend masks the same way.

The target means the sparsity of every masked linear input for teal, teal-greedy and
stat-topk, and the MLP neuron sparsity (the fraction of up/down columns skipped) for cats and
cett. ``overall_sparsity`` is comparable across methods: the parameter-weighted sparsity over
all decoder linears a plan may mask (the LM head excluded), counting an unmasked linear (the
gate under CATS, attention under CATS/CETT) as dense.

A ``Calibrator`` keeps the statistics of one pass so that many plans (methods, targets) can be
made from one model run; ``calibrate`` is the one-plan shortcut.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from ..plan import SparsityPlan, fingerprint
from .cats import cats_rules, mlp_downs, skipped_modules
from .cett import budget_for_sparsity, cett_thresholds
from .greedy import GreedyPath, greedy_paths
from .histogram import Statistics, collect_statistics
from .sites import SiteRecord, masked_sites, trace_sites
from .stat_topk import stat_topk_measured
from .teal import teal_rules, wina_rules

METHODS = ("teal", "teal-greedy", "cats", "cett", "stat-topk")
#: What ``calibrate`` accepts: the statistics methods plus trained predictors (predictor.py).
CALIBRATE_METHODS = METHODS + ("predictor",)
CALIBRATION_ARTICLES = 10  # WikiText-2 test articles 0-9 calibrate; articles 10+ evaluate
_NEEDS = {"teal": ("abs",), "teal-greedy": ("abs",), "cats": ("act",), "cett": ("act", "cett"),
          "stat-topk": ("rel",)}


class CalibrationError(ValueError):
    """Bad calibration arguments (method, sparsity, data)."""


def wikitext2_split(data_dir=None, calibration_articles: int = CALIBRATION_ARTICLES
                    ) -> tuple[str, str, dict[str, Any]]:
    """(calibration text, evaluation text, description): disjoint WikiText-2 test articles.

    Calibration takes the first articles and evaluation the rest, so a plan is never judged
    on the text it was fitted to.
    """
    from ..eval import load_wikitext2, wikitext2_articles

    arts = wikitext2_articles(load_wikitext2(data_dir))
    if len(arts) <= calibration_articles:
        raise CalibrationError(f"WikiText-2 has {len(arts)} articles; cannot keep "
                               f"{calibration_articles} for calibration and evaluate on the rest")
    k = calibration_articles
    info = {"calibration": f"wikitext2 test articles 0-{k - 1}",
            "evaluation": f"wikitext2 test articles {k}-{len(arts) - 1}",
            "source": f"wikitext2 test articles 0-{k - 1} (disjoint from the evaluation articles {k}+)"}
    return "".join(arts[:k]), "".join(arts[k:]), info


def _check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise CalibrationError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def token_batches(tokens_or_texts, tokenizer=None, *, token_budget: int = 16384, batch_size: int = 4,
                  seq_len: int = 512, seed: int = 0) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Calibration batches ``[B, seq_len]`` from token ids or texts, at most ``token_budget`` tokens.

    Texts are tokenised without special tokens and cut into sequences; with a tokenizer that
    adds BOS by default (Gemma) each sequence starts with BOS, as the model expects. When the
    text has more sequences than the budget needs, a seeded random subset is used.
    """
    if token_budget < 1 or batch_size < 1 or seq_len < 2:
        raise CalibrationError(f"need token_budget >= 1, batch_size >= 1, seq_len >= 2; got "
                               f"{token_budget}, {batch_size}, {seq_len}")
    from ..eval.perplexity import adds_bos, encode

    bos = None
    if tokenizer is not None and adds_bos(tokenizer):
        bos = tokenizer.bos_token_id
    if isinstance(tokens_or_texts, str):
        tokens_or_texts = [tokens_or_texts]
    if isinstance(tokens_or_texts, torch.Tensor):
        t = tokens_or_texts.long()
        rows = [r for r in (t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1]))]
        kind = "token ids"
    elif isinstance(tokens_or_texts, Sequence) and tokens_or_texts and all(isinstance(x, str) for x in tokens_or_texts):
        if tokenizer is None:
            raise CalibrationError("calibration texts need a tokenizer (tokenizer=...)")
        ids: list[int] = []
        for text in tokens_or_texts:
            ids += encode(tokenizer, text)
        rows = [torch.tensor(ids, dtype=torch.long)]
        kind = f"{len(tokens_or_texts)} text(s)"
    elif isinstance(tokens_or_texts, Sequence) and tokens_or_texts and all(isinstance(x, int) for x in tokens_or_texts):
        rows = [torch.tensor(list(tokens_or_texts), dtype=torch.long)]
        kind = "token ids"
    else:
        raise CalibrationError("calibration data must be a string, a list of strings, or token ids "
                               "(a list of ints or a LongTensor)")
    body = seq_len - (1 if bos is not None else 0)
    chunks = [r[i : i + body] for r in rows for i in range(0, len(r) - body + 1, body)]
    if not chunks:  # shorter than one sequence: use what there is
        longest = max(rows, key=len)
        if len(longest) < 1:
            raise CalibrationError("calibration data is empty")
        chunks = [longest[:body]]
    want = max(1, token_budget // len(chunks[0]))
    if len(chunks) > want:
        pick = sorted(random.Random(seed).sample(range(len(chunks)), want))
        chunks = [chunks[i] for i in pick]
    if bos is not None:
        chunks = [torch.cat([torch.tensor([bos]), c]) for c in chunks]
    seqs = torch.stack(chunks)
    batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
    info = {"tokens": int(sum(len(c) for c in chunks)), "sequences": len(chunks),
            "seq_len": int(seqs.shape[1]), "bos": bos is not None, "data": kind}
    return batches, info


def overall_sparsity(sites: list[SiteRecord], measured: dict[str, float]) -> float:
    """Parameter-weighted sparsity over every maskable decoder linear (unmasked count as 0)."""
    ms = masked_sites(sites)
    total = sum(s.params for s in ms)
    return sum(measured.get(s.module, 0.0) * s.params for s in ms) / total if total else 0.0


class Calibrator:
    """Statistics of one calibration pass, from which plans of any method and target are made."""

    def __init__(self, model: torch.nn.Module, tokens_or_texts, tokenizer=None, *,
                 methods: Sequence[str] = METHODS, token_budget: int = 16384, batch_size: int = 4,
                 seq_len: int = 512, seed: int = 0, progress: bool = True, source: str | None = None,
                 cett_tokens: int = 256, greedy_tokens: int = 256, greedy_step: float = 0.02,
                 wina: bool = False) -> None:
        for m in methods:
            if m not in METHODS:
                raise CalibrationError(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
        self.model, self.progress, self.seed = model, progress, seed
        self.greedy_step, self.greedy_tokens = greedy_step, greedy_tokens
        self.batches, self.data_info = token_batches(tokens_or_texts, tokenizer, token_budget=token_budget,
                                                     batch_size=batch_size, seq_len=seq_len, seed=seed)
        self.source = source or f"caller-provided {self.data_info['data']}"
        self.sites = trace_sites(model)
        if not masked_sites(self.sites):
            raise CalibrationError("no maskable linear layer found in the model's traced graph")
        what = tuple(sorted({w for m in methods for w in _NEEDS[m]} | ({"wina"} if wina else set())))
        self.what = what
        self.stats: Statistics = collect_statistics(
            model, self.sites, self.batches, what=what, cett_tokens=cett_tokens,
            total_tokens=self.data_info["tokens"], progress=progress)
        self.cett_tokens = cett_tokens
        self._greedy: dict[bool, tuple[float, dict[int | None, GreedyPath]]] = {}
        self.fingerprint = fingerprint(model)

    # ------------------------------------------------------------------ greedy
    def greedy(self, max_target: float, wina: bool = False) -> dict[int | None, GreedyPath]:
        """The greedy paths up to ``max_target`` (computed once, reused for lower targets)."""
        hit = self._greedy.get(wina)
        if hit is None or hit[0] < max_target:
            seqs = torch.cat(self.batches)
            length = min(seqs.shape[1], 256)
            count = max(1, min(len(seqs), self.greedy_tokens // length))
            paths = greedy_paths(self.model, self.sites, self.stats, [seqs[:count, :length]],
                                 max_target=max_target, step=self.greedy_step, progress=self.progress,
                                 wina=wina)
            self._greedy[wina] = hit = (max_target, paths)
            self._greedy_shape = (count, length)
        return hit[1]

    # ------------------------------------------------------------------ plans
    def plan(self, method: str, sparsity: float | None = 0.5, *, error_budget: float | None = None,
             wina: bool = False) -> SparsityPlan:
        if method not in METHODS:
            raise CalibrationError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        missing = [w for w in _NEEDS[method] if w not in self.what]
        if missing:
            raise CalibrationError(f"this Calibrator gathered no statistics for {method!r}; "
                                   f"create it with methods including {method!r}")
        if wina:
            if method not in ("teal", "teal-greedy"):
                raise CalibrationError("wina applies to the teal and teal-greedy methods only")
            if "wina" not in self.what:
                raise CalibrationError("this Calibrator gathered no WINA statistics; create it with wina=True")
        if error_budget is not None and method != "cett":
            raise CalibrationError("error_budget applies to method 'cett' only")
        if error_budget is None or method != "cett":
            sparsity = _check_sparsity(sparsity)
        info: dict[str, Any] = {}
        thresholds: dict[str, float] = {}
        acts: dict[str, float] = {}
        if method == "teal":
            rules = wina_rules if wina else teal_rules
            thresholds, measured = rules(self.sites, self.stats, sparsity)
            scope = "every masked linear input"
        elif method == "teal-greedy":
            paths = self.greedy(max(sparsity, 1e-9), wina=wina)
            measured = {}
            for path in paths.values():
                for unit, group, s in zip(path.units, path.groups, path.at(sparsity)):
                    hist = self.stats.wina[unit] if wina else self.stats.abs[group]
                    thresholds[unit] = hist.quantile(s) if s > 0 else 0.0
                    measured[unit] = hist.cdf(thresholds[unit])
            info["greedy"] = {"step": self.greedy_step, "sequences": self._greedy_shape[0],
                              "seq_len": self._greedy_shape[1],
                              "evaluations": sum(p.evaluations for p in paths.values()),
                              "block_sparsity": {str(b): _block_sparsity(p, sparsity) for b, p in paths.items()}}
            scope = "parameter-weighted sparsity of each block's masked linears"
        elif method == "cats":
            acts, measured = cats_rules(self.sites, self.stats, sparsity)
            scope = "MLP neurons (up/down columns)"
        elif method == "cett":
            acts, measured, info["cett"] = self._cett(sparsity, error_budget)
            scope = "MLP neurons (up/down columns)"
            if error_budget is not None:
                sparsity = None
        else:  # stat-topk
            plan = SparsityPlan.statistical(sparsity, self.model)
            measured = stat_topk_measured(self.sites, self.stats, plan.stat_topk)
            scope = "every masked linear input"
        if method != "stat-topk":
            plan = SparsityPlan(thresholds=thresholds, activation_thresholds=acts, method=method,
                                target=sparsity, score="wina" if wina else "abs")
        plan.method, plan.target = method, sparsity
        plan.model = self.fingerprint
        plan.roles = {s.module: s.role for s in masked_sites(self.sites)}
        plan.measured = {k: round(v, 6) for k, v in measured.items()}
        plan.overall_sparsity = round(overall_sparsity(self.sites, measured), 6)
        plan.info = {"source": self.source, **self.data_info, "seed": self.seed,
                     "target_scope": scope,
                     "measured_on": "calibration tokens, dense-model activations (histograms)",
                     **info}
        plan.validate(self.model)
        return plan

    def _cett(self, sparsity: float | None, budget: float | None):
        downs = mlp_downs(self.sites)
        samples = {s.module: self.stats.cett[s.module] for s in downs}
        hists = {s.module: self.stats.act[s.module] for s in downs}
        sizes = {s.module: float(s.params * len(skipped_modules(s))) for s in downs}
        searched = budget is None
        if searched:
            budget = budget_for_sparsity(samples, hists, sizes, sparsity)
        if not budget >= 0:
            raise CalibrationError(f"error_budget must be >= 0, got {budget}")
        th = cett_thresholds(samples, budget)
        acts, measured, errors = {}, {}, {}
        for s in downs:
            t, err = th[s.module]
            acts[s.module] = t
            errors[s.module] = round(err, 6)
            for m in skipped_modules(s):
                measured[m] = hists[s.module].cdf(t)
        info = {"error_budget": budget, "budget_searched_for_target": searched,
                "tokens": samples[downs[0].module].rows if downs else 0, "error": errors,
                "mean_error": sum(errors.values()) / max(1, len(errors))}
        return acts, measured, info


def _block_sparsity(path: GreedyPath, target: float) -> float:
    s = path.at(target)
    return round(sum(a * p for a, p in zip(s, path.params)) / sum(path.params), 6)


def calibrate(model: torch.nn.Module, tokens_or_texts, method: str = "teal-greedy", sparsity: float = 0.5,
              tokenizer=None, *, token_budget: int = 16384, batch_size: int = 4, seq_len: int = 512,
              wina: bool = False, error_budget: float | None = None, progress: bool = True, seed: int = 0,
              source: str | None = None, greedy_step: float = 0.02, greedy_tokens: int = 256,
              cett_tokens: int = 256) -> SparsityPlan:
    """Calibrate a SparsityPlan for ``model`` on ``tokens_or_texts`` (see the module docstring).

    ``error_budget`` (cett only): the CETT budget; without it the budget is searched so that
    the MLP neuron sparsity reaches ``sparsity``. ``source`` describes the calibration text in
    the plan's info. ``greedy_*``: block-error tokens and step of the teal-greedy allocation;
    ``cett_tokens``: tokens the CETT error is measured on.
    """
    if method not in CALIBRATE_METHODS:
        raise CalibrationError(f"unknown method {method!r}; allowed: {', '.join(CALIBRATE_METHODS)}")
    if method == "predictor":  # trained low-rank predictors (Deja Vu style), predictor.py
        if wina or error_budget is not None:
            raise CalibrationError("wina and error_budget do not apply to method 'predictor'")
        _check_sparsity(sparsity)
        from .predictor import train_predictor_plan

        return train_predictor_plan(model, tokens_or_texts, sparsity, tokenizer, token_budget=token_budget,
                                    seq_len=seq_len, seed=seed, progress=progress, source=source)
    if wina and method not in ("teal", "teal-greedy"):
        raise CalibrationError("wina applies to the teal and teal-greedy methods only")
    if error_budget is not None and method != "cett":
        raise CalibrationError("error_budget applies to method 'cett' only")
    if error_budget is None or method != "cett":
        _check_sparsity(sparsity)
    cal = Calibrator(model, tokens_or_texts, tokenizer, methods=(method,), token_budget=token_budget,
                     batch_size=batch_size, seq_len=seq_len, seed=seed, progress=progress, source=source,
                     cett_tokens=cett_tokens, greedy_tokens=greedy_tokens, greedy_step=greedy_step,
                     wina=wina)
    return cal.plan(method, sparsity, error_budget=error_budget, wina=wina)
