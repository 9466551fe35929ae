"""One calibration pass over the dense model: streaming statistics of every site's input.

Module hooks on the sites the backend would mask (``sites.trace_sites``) feed log-histograms
(``histogram.LogHistogram``) and, for CETT, sampled per-token contribution norms; what is
gathered depends on the methods asked for (``Statistics``'s fields).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..ops.reference import activation
from .cett_sample import CettSample
from .histogram import LogHistogram
from .sites import SiteRecord, groups

#: Every kind of statistic a method may ask for.
KINDS = ("abs", "rel", "act", "cett", "wina")


def weight_in_out(mod: torch.nn.Module) -> torch.Tensor:
    """A linear-like module's weight as ``[in, out]`` (nn.Linear stores ``[out, in]``, Conv1D not)."""
    w = mod.weight
    return w.t() if isinstance(mod, torch.nn.Linear) else w


def column_norms(mod: torch.nn.Module) -> torch.Tensor:
    """||W[:, i]||_2 for each input channel i, in fp32: WINA's weight factor."""
    return weight_in_out(mod).detach().double().norm(dim=1).float()


@dataclass
class Statistics:
    """What one calibration pass over the dense model gathered, per site.

    * ``abs[group]``: |x| of each shared linear input (TEAL thresholds).
    * ``rel[group]``: |x| / mean|x| per token (statistical top-k's measured sparsity).
    * ``act[down]``: |act(gate x)| of each gated MLP, or |down input| of a plain one (CATS).
    * ``cett[down]``: per-token prefix norms of truncated neuron contributions (CETT).
    * ``wina[linear]``: |x_i| * ||W[:, i]|| per linear (WINA scores; each linear of a shared
      input has its own, since the column norms differ), with ``col_norms[linear]``.
    """

    sites: list[SiteRecord]
    abs: dict[str, LogHistogram] = field(default_factory=dict)
    rel: dict[str, LogHistogram] = field(default_factory=dict)
    act: dict[str, LogHistogram] = field(default_factory=dict)
    cett: dict[str, CettSample] = field(default_factory=dict)
    wina: dict[str, LogHistogram] = field(default_factory=dict)
    col_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    sequences: int = 0


def collect_statistics(
    model: torch.nn.Module,
    sites: list[SiteRecord],
    batches: Iterable[torch.Tensor],
    *,
    what: tuple[str, ...] = ("abs", "rel", "act", "cett"),
    cett_tokens: int = 256,
    total_tokens: int | None = None,
    progress: bool = False,
) -> Statistics:
    """Run the dense model over ``batches`` (LongTensors [B, T]) with observing hooks."""
    stats = Statistics(sites=sites)
    mods = dict(model.named_modules())
    handles = []
    gated_act: dict[str, torch.Tensor] = {}
    cett_stride = max(1, (total_tokens or cett_tokens) // max(cett_tokens, 1))

    def on_group_input(group: str):
        def hook(mod, args):
            x = args[0].detach()
            if "abs" in what:
                stats.abs[group].update(x)
            if "rel" in what:
                x2 = x.reshape(-1, x.shape[-1]).float()
                scale = x2.abs().mean(-1, keepdim=True).clamp_min(1e-30)
                stats.rel[group].update(x2 / scale)
            if "wina" in what:
                for m in members[group]:
                    stats.wina[m].update(x, scale=stats.col_norms[m])
        return hook

    def on_gate_output(down: str, act: str):
        def hook(mod, args, out):
            a = activation(act, out.detach().float())
            if "act" in what:
                stats.act[down].update(a)
            if "cett" in what:
                gated_act[down] = a
        return hook

    def on_down(site: SiteRecord):
        def hook(mod, args, out):
            h = args[0].detach()
            if "act" in what and site.gate is None:
                stats.act[site.module].update(h)
            if "cett" in what:
                a = gated_act.pop(site.module, None)
                a = (h if a is None else a).reshape(-1, h.shape[-1])
                stats.cett[site.module].add(a, h.reshape(-1, h.shape[-1]),
                                            out.detach().reshape(-1, out.shape[-1]),
                                            weight_in_out(mod).detach(), cett_stride)
        return hook

    members = {g: [s.module for s in ms] for g, ms in groups(sites).items()}
    for group in groups(sites):
        if "abs" in what:
            stats.abs[group] = LogHistogram()
        if "rel" in what:
            stats.rel[group] = LogHistogram()
        if "wina" in what:
            for m in members[group]:
                stats.wina[m] = LogHistogram()
                stats.col_norms[m] = column_norms(mods[m])
        if "abs" in what or "rel" in what or "wina" in what:
            handles.append(mods[group].register_forward_pre_hook(on_group_input(group)))
    for s in sites:
        if s.role != "mlp_down" or not ("act" in what or "cett" in what):
            continue
        if "act" in what:
            stats.act[s.module] = LogHistogram()
        if "cett" in what:
            stats.cett[s.module] = CettSample(limit=cett_tokens)
        if s.gate is not None:
            handles.append(mods[s.gate].register_forward_hook(on_gate_output(s.module, s.act)))
        handles.append(mods[s.module].register_forward_hook(on_down(s)))

    batches = list(batches)
    try:
        with torch.inference_mode():
            for ids in tqdm(batches, desc="calibration statistics", disable=not progress, leave=False):
                model(input_ids=ids.to(next(model.parameters()).device), **no_cache(model))
                stats.tokens += ids.numel()
                stats.sequences += ids.shape[0]
    finally:
        for h in handles:
            h.remove()
    return stats


def no_cache(model) -> dict:
    """``use_cache=False`` where the model takes it: calibration runs whole sequences."""
    try:
        return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        return {}
