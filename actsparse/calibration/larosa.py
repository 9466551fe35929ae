"""Rotated activations (after LaRoSA): one orthogonal rotation per shared linear input.

For each masked input x (q/k/v share one, gate/up share one, o and down have their own) the
rotation Q holds the eigenvectors of the calibration second moment ``E[x^T x]``, largest
eigenvalue first. In that basis the input's energy sits in few coordinates, so keeping the k
largest ``|x Q|`` per token loses less than keeping the k largest ``|x|``. The linear then reads
``y = (x Q)_masked (W Q)^T``, which is ``x W^T`` exactly when nothing is masked (Q Q^T = I).

This is an accuracy study, not yet a plan rule: ``fit_rotations`` gathers the moments and
returns the rotations; ``eval.rotated.rotated_topk`` applies them with hooks (the reference).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .method import CalibrationError
from .sites import SiteRecord, groups

#: Which shared inputs may be rotated: every masked one, or only the residual-stream inputs
#: (q/k/v, gate/up), the ones a rotation could be absorbed into a basis change of the stream.
SCOPES = {"all": ("attn_in", "attn_out", "mlp_in", "mlp_down"), "residual": ("attn_in", "mlp_in")}


def rotation_groups(sites: list[SiteRecord], scope: str = "all") -> dict[str, list[SiteRecord]]:
    """The shared inputs ``scope`` rotates (keyed by the group's first module)."""
    if scope not in SCOPES:
        raise CalibrationError(f"unknown rotation scope {scope!r}; allowed: {', '.join(SCOPES)}")
    return {g: ms for g, ms in groups(sites).items() if ms[0].role in SCOPES[scope]}


def eigen_rotation(moment: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q [d, d] (columns: eigenvectors of the symmetric ``moment``, largest first)."""
    moment = moment.double()
    vals, vecs = torch.linalg.eigh(0.5 * (moment + moment.T))
    return vecs.flip(-1).float()


@torch.no_grad()
def second_moments(model: torch.nn.Module, sites: list[SiteRecord], batches: Iterable[torch.Tensor],
                   scope: str = "all") -> tuple[dict[str, torch.Tensor], int]:
    """``sum_t x_t^T x_t`` (float64) of each rotated input over ``batches``, and the token count."""
    mods = dict(model.named_modules())
    acc: dict[str, torch.Tensor] = {}
    handles = []

    def hook(group: str):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            m = x.T @ x
            acc[group] = m if group not in acc else acc[group] + m
        return fn

    for g in rotation_groups(sites, scope):
        handles.append(mods[g].register_forward_pre_hook(hook(g)))
    tokens = 0
    try:
        for ids in batches:
            kwargs = {"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {}
            model(input_ids=ids, **kwargs)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return acc, tokens


def fit_rotations(model: torch.nn.Module, sites: list[SiteRecord], batches: Sequence[torch.Tensor],
                  scope: str = "all") -> dict[str, torch.Tensor]:
    """Rotation per rotated group (first module's name -> Q [d, d]) from calibration batches."""
    moments, tokens = second_moments(model, sites, batches, scope)
    if not tokens:
        raise CalibrationError("no calibration tokens: cannot estimate rotations")
    return {g: eigen_rotation(m) for g, m in moments.items()}
