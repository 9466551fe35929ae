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
"""

from __future__ import annotations

from typing import Any

import torch

from ..plan import InputThresholds
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
                          sparsity: float) -> tuple[dict[str, float], dict[str, float]]:
    """(thresholds, fraction masked on the calibration tokens) of every masked linear, each
    group's threshold the quantile of its input with every earlier group's mask applied.

    ``ids`` [B, T]: the calibration sequences, run as one batch.
    """
    members = groups(sites)
    owner = {s.module: g for g, ms in members.items() for s in ms}
    found: dict[str, tuple[float, float]] = {}  # group -> (threshold, fraction masked)
    mods = dict(model.named_modules())
    handles = []

    def hook(module_name: str):
        group = owner[module_name]

        def pre(mod, args):
            x = args[0]
            if group not in found:  # the first of its members to run (q before k and v)
                t = exact_quantile(x, sparsity)
                found[group] = (t, float((x.abs().float() <= t).float().mean()) if t > 0 else 0.0)
            t = found[group][0]
            if t <= 0:
                return None
            return (torch.where(x.abs().float() > t, x, torch.zeros((), dtype=x.dtype)),) + tuple(args[1:])
        return pre

    def stop(mod, args):
        raise _Stop

    for name in owner:
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
    missing = sorted(set(members) - set(found))
    if missing:
        raise CalibrationError(f"teal-seq: the calibration pass never reached {', '.join(missing[:3])}")
    thresholds = {m: found[g][0] for m, g in owner.items()}
    measured = {m: found[g][1] for m, g in owner.items()}
    return thresholds, measured


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
