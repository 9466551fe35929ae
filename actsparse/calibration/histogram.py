"""Streaming statistics of site inputs: fixed-bin log-spaced histograms, gathered by hooks.

Thresholds are quantiles of |x|. A histogram with fixed log-spaced bins keeps memory
independent of the number of calibration tokens and gives any quantile to within one bin.
The bins are those of the float32 format itself: the exponent and the top ``mantissa_bits``
bits of the mantissa, i.e. ``2**mantissa_bits`` equal bins per octave (relative width at most
``2**-mantissa_bits``, 0.8% by default). Binning is then a bit shift and a ``bincount``, about
five times faster than ``histc`` on logarithms, which matters: the hooks see every activation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..kernels.reference import activation
from .sites import SiteRecord, groups


class LogHistogram:
    """Counts of non-negative values in log-spaced bins over ``[2**-octaves, 2**octaves)``.

    Bin 0 holds zeros and everything below the range (treated as zero); values above the
    range go to the last bin.
    """

    def __init__(self, mantissa_bits: int = 7, octaves: int = 48) -> None:
        if not 0 <= mantissa_bits <= 12 or not 1 <= octaves <= 126:
            raise ValueError(f"need 0 <= mantissa_bits <= 12 and 1 <= octaves <= 126, "
                             f"got {mantissa_bits}, {octaves}")
        self.m = mantissa_bits
        self.shift = 23 - mantissa_bits
        self.base = (127 - octaves) << mantissa_bits  # bit pattern >> shift of 2**-octaves
        self.bins = (2 * octaves) << mantissa_bits
        self.counts = torch.zeros(self.bins, dtype=torch.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def relative_width(self) -> float:
        """Upper bound of a bin's width relative to its lower edge."""
        return 2.0 ** -self.m

    def _index(self, v: torch.Tensor) -> torch.Tensor:
        idx = (v.view(torch.int32) >> self.shift) - self.base
        return idx.clamp_(0, self.bins - 1)

    def update(self, values: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Add ``|values|`` (times ``scale``, broadcast on the last dim: WINA's ``|x_i| ||W_i||``)."""
        v = values.detach().float().abs()
        if scale is not None:
            v = v * scale.to(v.device).float().abs()
        v = v.contiguous().reshape(-1)
        if v.numel():  # binned where the values are (GPU or CPU), counts kept on the CPU
            self.counts += torch.bincount(self._index(v).long(), minlength=self.bins).cpu()

    def merge(self, other: LogHistogram) -> None:
        if (other.m, other.base, other.bins) != (self.m, self.base, self.bins):
            raise ValueError("cannot merge histograms with different bins")
        self.counts += other.counts

    def edges(self, b: int) -> tuple[float, float]:
        """Value range ``[lo, hi)`` of bin ``b`` (bin 0 starts at 0)."""
        bits = torch.tensor([b + self.base, b + 1 + self.base], dtype=torch.int32) << self.shift
        lo, hi = bits.view(torch.float32).tolist()
        return (0.0 if b == 0 else lo), hi

    def quantile(self, q: float) -> float:
        """The value t with a fraction ``q`` of the data at or below it (linear within a bin)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        cum = torch.cumsum(self.counts, 0)
        total = int(cum[-1])
        if total == 0:
            raise ValueError("empty histogram: no calibration data reached this site")
        target = q * total
        if q == 0.0 or target <= int(cum[0]):
            return 0.0
        b = int(torch.searchsorted(cum.double(), torch.tensor([target], dtype=torch.float64))[0])
        b = min(b, self.bins - 1)
        prev = int(cum[b - 1]) if b > 0 else 0
        lo, hi = self.edges(b)
        frac = (target - prev) / max(int(self.counts[b]), 1)
        return lo + frac * (hi - lo)

    def cdf(self, t: float) -> float:
        """Fraction of the data at or below ``t``: the sparsity of the mask ``|x| > t``."""
        total = self.total
        if total == 0:
            return 0.0
        if t <= 0:
            return int(self.counts[0]) / total if t == 0 else 0.0
        b = int(self._index(torch.tensor([t], dtype=torch.float32))[0])
        lo, hi = self.edges(b)
        frac = min(max((t - lo) / (hi - lo), 0.0), 1.0)
        below = int(self.counts[:b].sum()) + frac * int(self.counts[b])
        return min(below / total, 1.0)


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
    cett: dict[str, object] = field(default_factory=dict)
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
