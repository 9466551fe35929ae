"""Streaming statistics of site inputs: fixed-bin log-spaced histograms, gathered by hooks.

Thresholds are quantiles of |x|. A histogram with fixed log-spaced bins keeps memory
independent of the number of calibration tokens and gives any quantile to within one bin
(a relative error of 10**(decades/bins) - 1, about 0.5% with the defaults), which is far below
the sampling noise of a few thousand calibration tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..kernels.reference import activation
from .sites import SiteRecord, groups


class LogHistogram:
    """Counts of non-negative values in ``bins`` log-spaced bins over ``[lo, hi]``.

    Exact zeros, values below ``lo`` and values above ``hi`` are counted apart, so the
    quantiles at the ends stay meaningful (an all-zero input has quantile 0).
    """

    def __init__(self, lo: float = 1e-10, hi: float = 1e6, bins: int = 8192) -> None:
        if not 0 < lo < hi:
            raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
        self.lo, self.hi, self.bins = math.log10(lo), math.log10(hi), int(bins)
        self.width = (self.hi - self.lo) / self.bins  # bin width in log10 units
        self.counts = torch.zeros(self.bins, dtype=torch.float64)
        self.zeros = 0.0
        self.under = 0.0  # 0 < v < lo
        self.over = 0.0  # v > hi
        self.vmax = 0.0

    @property
    def total(self) -> float:
        return self.zeros + self.under + float(self.counts.sum()) + self.over

    def update(self, values: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Add ``|values|`` (times ``scale``, broadcast on the last dim: WINA's ``|x_i| ||W_i||``)."""
        v = values.detach().float().abs()
        if scale is not None:
            v = v * scale.float()
        v = v.reshape(-1)
        if v.numel() == 0:
            return
        self.vmax = max(self.vmax, float(v.max()))
        logv = torch.log10(v)  # -inf for zeros
        self.zeros += float((v == 0).sum())
        self.under += float(((v > 0) & (logv < self.lo)).sum())
        self.over += float((logv > self.hi).sum())
        self.counts += torch.histc(logv, bins=self.bins, min=self.lo, max=self.hi).double()

    def merge(self, other: LogHistogram) -> None:
        if (other.lo, other.hi, other.bins) != (self.lo, self.hi, self.bins):
            raise ValueError("cannot merge histograms with different bins")
        self.counts += other.counts
        self.zeros += other.zeros
        self.under += other.under
        self.over += other.over
        self.vmax = max(self.vmax, other.vmax)

    def quantile(self, q: float) -> float:
        """The value t with a fraction ``q`` of the data at or below it (log-linear in a bin)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        total = self.total
        if total == 0:
            raise ValueError("empty histogram: no calibration data reached this site")
        target = q * total
        if q == 0.0 or target <= self.zeros:
            return 0.0
        if target <= self.zeros + self.under:
            return 10.0 ** self.lo
        cum = torch.cumsum(self.counts, 0) + self.zeros + self.under
        if target > float(cum[-1]):
            return self.vmax
        b = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))[0])
        prev = float(cum[b - 1]) if b > 0 else self.zeros + self.under
        frac = (target - prev) / max(float(self.counts[b]), 1e-300)
        return min(10.0 ** (self.lo + (b + frac) * self.width), self.vmax)

    def cdf(self, t: float) -> float:
        """Fraction of the data at or below ``t``: the sparsity of the mask ``|x| > t``."""
        total = self.total
        if total == 0:
            return 0.0
        if t >= self.vmax:
            return 1.0
        if t <= 0:
            return self.zeros / total
        lt = math.log10(t)
        if lt < self.lo:
            return (self.zeros + self.under) / total
        if lt >= self.hi:
            return (total - self.over) / total
        p = (lt - self.lo) / self.width
        b = min(int(p), self.bins - 1)
        below = self.zeros + self.under + float(self.counts[:b].sum()) + (p - b) * float(self.counts[b])
        return below / total

    def bin_edges(self, t: float) -> tuple[float, float]:
        """The edges of the bin holding ``t`` (for tolerance checks)."""
        b = math.floor((math.log10(t) - self.lo) / self.width)
        return 10.0 ** (self.lo + b * self.width), 10.0 ** (self.lo + (b + 1) * self.width)


def weight_in_out(mod: torch.nn.Module) -> torch.Tensor:
    """A linear-like module's weight as ``[in, out]`` (nn.Linear stores ``[out, in]``, Conv1D not)."""
    w = mod.weight
    return w.t() if isinstance(mod, torch.nn.Linear) else w


@dataclass
class Statistics:
    """What one calibration pass over the dense model gathered, per site.

    * ``abs[group]``: |x| of each shared linear input (TEAL thresholds).
    * ``rel[group]``: |x| / rms(x) per token (statistical top-k's measured sparsity).
    * ``act[down]``: |act(gate x)| of each gated MLP, or |down input| of a plain one (CATS).
    * ``cett[down]``: per-token prefix norms of truncated neuron contributions (CETT).
    """

    sites: list[SiteRecord]
    abs: dict[str, LogHistogram] = field(default_factory=dict)
    rel: dict[str, LogHistogram] = field(default_factory=dict)
    act: dict[str, LogHistogram] = field(default_factory=dict)
    cett: dict[str, object] = field(default_factory=dict)
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
    from .cett import CettSample

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
                rms = x2.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)
                stats.rel[group].update(x2 / rms)
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

    for group in groups(sites):
        if "abs" in what:
            stats.abs[group] = LogHistogram()
        if "rel" in what:
            stats.rel[group] = LogHistogram()
        if "abs" in what or "rel" in what:
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
    from tqdm.auto import tqdm

    try:
        with torch.inference_mode():
            for ids in tqdm(batches, desc="calibration statistics", disable=not progress, leave=False):
                model(input_ids=ids.to(next(model.parameters()).device), **_no_cache(model))
                stats.tokens += ids.numel()
                stats.sequences += ids.shape[0]
    finally:
        for h in handles:
            h.remove()
    return stats


def _no_cache(model) -> dict:
    import inspect

    try:
        return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        return {}
