"""TEAL, sequential: each threshold is found on the activations it will meet at run time.

Uniform TEAL takes every input's |x| quantile from the dense model; but once earlier layers
are masked, a later layer's input is no longer the dense model's, so its threshold masks more
or less than the target. Here the calibration sequences run once through the model with one
hook per shared input, in execution order: the hook takes the exact |x| quantile of the input
it receives (earlier masks already applied), records it, and passes the masked input on. So
every threshold is calibrated on the activation distribution of the masked model, as TEAL's
own greedy and CATS-style layer-by-layer calibration argue, at the cost of one forward pass per
target (no histograms). Every calibration sequence goes through in one batch, since a quantile
needs every token of the input; the output head is not run.

``teal-seq`` gives every linear the target; ``teal-greedy-seq`` gives each linear its sparsity
from TEAL's greedy allocation (``greedy``) and calibrates its threshold the same sequential way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..plan import InputThresholds
from .greedy import greedy_for
from .method import CalibrationError, Made, Method, register_method
from .sites import SiteRecord, groups
from .statistics import no_cache


class _Stop(Exception):
    """Raised at the output head: the logits are not needed."""


def exact_quantile(x: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of |x| (the k-th smallest entry, k = round(q * n)); 0 for q = 0."""
    a = x.detach().abs().float().reshape(-1)
    k = int(round(q * a.numel()))
    if k <= 0:
        return 0.0
    return float(a.kthvalue(min(k, a.numel())).values)


def sequential_thresholds(model: torch.nn.Module, sites: list[SiteRecord], ids: torch.Tensor,
                          sparsity: float | Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(thresholds, fraction masked on the calibration tokens) of every masked linear, each
    threshold the quantile of the input that linear receives with every earlier mask applied.

    ``sparsity``: one target for every linear, or one per linear (module name -> sparsity).
    ``ids`` [B, T]: the calibration sequences, run as one batch.
    """
    names = [s.module for ms in groups(sites).values() for s in ms]
    target = sparsity if isinstance(sparsity, Mapping) else {m: sparsity for m in names}
    found: dict[str, tuple[float, float]] = {}  # module -> (threshold, fraction masked)
    mods = dict(model.named_modules())
    handles = []

    def hook(name: str):
        def pre(mod, args):
            x = args[0]
            if name not in found:
                t = exact_quantile(x, target.get(name, 0.0))
                found[name] = (t, float((x.abs().float() <= t).float().mean()) if t > 0 else 0.0)
            t = found[name][0]
            if t <= 0:
                return None
            return (torch.where(x.abs().float() > t, x, torch.zeros((), dtype=x.dtype)),) + tuple(args[1:])
        return pre

    def stop(mod, args):
        raise _Stop

    for name in names:
        handles.append(mods[name].register_forward_pre_hook(hook(name)))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        handles.append(head.register_forward_pre_hook(stop))
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(next(model.parameters()).device), **no_cache(model))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in names if m not in found]
    if missing:
        raise CalibrationError(f"sequential calibration never reached {', '.join(missing[:3])}")
    return {m: found[m][0] for m in names}, {m: found[m][1] for m in names}


def calibration_batch(batches: list[torch.Tensor]) -> torch.Tensor:
    """Every calibration sequence in one batch (sequences cut to the shortest length)."""
    if not batches:
        raise CalibrationError("teal-seq: no calibration sequences")
    length = min(b.shape[1] for b in batches)
    return torch.cat([b[:, :length] for b in batches])


@register_method
class TealSequential(Method):
    name = "teal-seq"
    needs = ()
    target_scope = "every masked linear input (measured on the masked model's activations)"

    def make(self, cal, sparsity: float, **_: Any) -> Made:
        ids = calibration_batch(cal.batches)
        key = ("teal-seq", round(sparsity, 9))
        if key not in cal.cache:
            cal.cache[key] = sequential_thresholds(cal.model, cal.sites, ids, sparsity)
        thresholds, measured = cal.cache[key]
        info = {"sequential": {"sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                               "measured_on": "calibration tokens, masked-model activations (exact quantiles)"}}
        return Made([InputThresholds(dict(thresholds))], dict(measured), sparsity, info)


@register_method
class TealGreedySequential(Method):
    name = "teal-greedy-seq"
    needs = ("abs",)  # the greedy allocation's thresholds
    target_scope = "parameter-weighted sparsity of each block's masked linears (masked-model activations)"

    def make(self, cal, sparsity: float, **_: Any) -> Made:
        ids = calibration_batch(cal.batches)
        paths = greedy_for(cal, max(sparsity, 1e-9))
        per = {u: s for p in paths.values() for u, s in zip(p.units, p.at(sparsity))}
        key = ("teal-greedy-seq", round(sparsity, 9))
        if key not in cal.cache:
            cal.cache[key] = sequential_thresholds(cal.model, cal.sites, ids, per)
        thresholds, measured = cal.cache[key]
        info = {"sequential": {"sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "allocation": "teal-greedy",
                               "measured_on": "calibration tokens, masked-model activations (exact quantiles)"}}
        return Made([InputThresholds(dict(thresholds))], dict(measured), sparsity, info)
