"""``Calibrator``: the statistics of one calibration pass, from which plans are made.

    cal = Calibrator(model, texts, tokenizer, methods=("teal", "cats"))
    plan = cal.plan("teal", 0.5)            # any registered method whose statistics were gathered
    plan = calibrate(model, texts, "teal-greedy", 0.5, tokenizer)   # the one-plan shortcut

One pass over the dense model gathers what the requested methods need, so that many plans
(methods, targets) come from one model run. The method itself (``method.METHODS``) turns the
statistics into rules; the Calibrator adds what every plan records: the model's fingerprint,
each site's role, the measured sparsity per linear and overall, and where the data came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..plan import SparsityPlan, fingerprint
from .data import token_batches
from .heads import add_head_routing
from .lm_head import add_lm_head_sparsity
from .method import METHODS, CalibrationError, check_options, get_method
from .sites import masked_sites, overall_sparsity, trace_sites
from .statistics import KINDS, Statistics, collect_statistics


class Calibrator:
    """Statistics of one calibration pass, from which plans of any method and target are made."""

    def __init__(self, model: torch.nn.Module, tokens_or_texts, tokenizer=None, *,
                 methods: Sequence[str] | None = None, needs: Sequence[str] = (), token_budget: int = 16384,
                 batch_size: int = 4, seq_len: int = 512, seed: int = 0, progress: bool = True,
                 source: str | None = None, cett_tokens: int = 256, greedy_tokens: int = 256,
                 greedy_step: float = 0.02, wina: bool = False) -> None:
        names = list(METHODS) if methods is None else list(methods)
        what = set(needs) | ({"wina"} if wina else set())
        for name in names:
            what |= set(get_method(name).needs)
        bad = sorted(what - set(KINDS))
        if bad:
            raise CalibrationError(f"unknown statistics {bad}; known: {', '.join(KINDS)}")
        self.model, self.progress, self.seed = model, progress, seed
        self.greedy_step, self.greedy_tokens, self.cett_tokens = greedy_step, greedy_tokens, cett_tokens
        self.batches, self.data_info = token_batches(tokens_or_texts, tokenizer, token_budget=token_budget,
                                                     batch_size=batch_size, seq_len=seq_len, seed=seed)
        self.source = source or f"caller-provided {self.data_info['data']}"
        self.sites = trace_sites(model)
        if not masked_sites(self.sites):
            raise CalibrationError("no maskable linear layer found in the model's traced graph")
        self.what = tuple(sorted(what))
        self.stats: Statistics = collect_statistics(
            model, self.sites, self.batches, what=self.what, cett_tokens=cett_tokens,
            total_tokens=self.data_info["tokens"], progress=progress)
        self.fingerprint = fingerprint(model)
        #: what methods compute once and reuse across targets (the greedy paths)
        self.cache: dict[Any, Any] = {}

    def plan(self, method: str, sparsity: float | None = 0.5, **options: Any) -> SparsityPlan:
        """A plan of ``method`` at the target ``sparsity`` (options: the method's own, e.g. wina)."""
        m = get_method(method)
        options = {k: v for k, v in options.items() if v is not None and v is not False}
        check_options(m, options)
        missing = [w for w in m.needs_with(options) if w not in self.what]
        if missing:
            raise CalibrationError(f"this Calibrator gathered no {', '.join(missing)} statistics for "
                                   f"{method!r}{' with these options' if options else ''}; create it with "
                                   f"methods including {method!r}" + (" and wina=True" if "wina" in missing else ""))
        sparsity = m.check_target(sparsity, options)
        made = m.make(self, sparsity, **options)
        plan = SparsityPlan(rules=made.rules, method=method, target=made.target, model=self.fingerprint)
        plan.roles = {s.module: s.role for s in masked_sites(self.sites)}
        plan.measured = {k: round(v, 6) for k, v in made.measured.items()}
        plan.overall_sparsity = round(overall_sparsity(self.sites, made.measured), 6)
        plan.info = {"source": self.source, **self.data_info, "seed": self.seed, "target_scope": m.target_scope,
                     "measured_on": "calibration tokens, dense-model activations (histograms)", **made.info}
        plan.validate(self.model)
        return plan


def calibrate(model: torch.nn.Module, tokens_or_texts, method: str = "teal-greedy", sparsity: float | None = 0.5,
              tokenizer=None, *, token_budget: int = 16384, batch_size: int = 4, seq_len: int = 512,
              progress: bool = True, seed: int = 0, source: str | None = None, greedy_step: float = 0.02,
              greedy_tokens: int = 256, cett_tokens: int = 256, head_density: float | None = None,
              head_tokens: int = 8192, lm_head_sparsity: float | None = None, **options: Any) -> SparsityPlan:
    """Calibrate a SparsityPlan for ``model`` on ``tokens_or_texts`` with a registered method.

    ``options`` are the method's own (``wina=True`` for teal / teal-greedy, ``error_budget`` for
    cett: without it the budget is searched so that the target is reached, ...); an option the
    method does not take is an error naming the methods that do. ``source`` describes the data in
    the plan's info; ``greedy_*``: block-error tokens and step of the teal-greedy allocation;
    ``cett_tokens``: tokens the CETT error is measured on.

    ``head_density`` adds trained head routers (``calibration.heads``) to the plan of any
    method: a mean fraction of attention units kept per token, on ``head_tokens`` tokens. For a
    method whose target is the head sparsity (``polar``) it sets that target.

    ``lm_head_sparsity`` (off by default) also masks the output head's input at that sparsity
    (``calibration.lm_head``).
    """
    m = get_method(method)
    options = {k: v for k, v in options.items() if v is not None and v is not False}
    check_options(m, options)
    if m.targets_heads and head_density is not None:
        sparsity, head_density = 1.0 - float(head_density), None
    m.check_target(sparsity, options)
    args = dict(token_budget=token_budget, batch_size=batch_size, seq_len=seq_len, seed=seed, progress=progress,
                source=source, cett_tokens=cett_tokens, greedy_tokens=greedy_tokens, greedy_step=greedy_step)
    if m.targets_heads:
        args["token_budget"] = head_tokens
    plan = m.calibrate(model, tokens_or_texts, sparsity, tokenizer, calibrator_args=args, options=options)
    if head_density is not None:
        add_head_routing(plan, model, tokens_or_texts, head_density, tokenizer, token_budget=head_tokens,
                         seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress)
    if lm_head_sparsity is not None:
        add_lm_head_sparsity(plan, model, tokens_or_texts, lm_head_sparsity, tokenizer, token_budget=token_budget,
                             batch_size=batch_size, seq_len=seq_len, seed=seed)
    return plan
