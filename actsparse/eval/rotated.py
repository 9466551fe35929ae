"""Rotated top-k applied eagerly with hooks: the reference for rotated activation sparsity.

``rotated_topk(model, sites, rotations, sparsity)`` makes each masked linear compute
``(x Q)_masked (W Q)^T`` where its input group has a rotation Q, and ``x_masked W^T``
(plain top-k) where it has none; masked means all but the ``k = round((1 - s) d)`` largest
magnitudes of each token are zeroed (fixed k, as LaRoSA does, so the count is the same on
every text). A pre-hook replaces the input by ``(x Q)_masked Q^T``, which the unchanged
linear turns into exactly that product.
"""

from __future__ import annotations

import contextlib

import torch

from ..calibration.sites import SiteRecord, groups


def keep_count(d: int, sparsity: float) -> int:
    """Entries kept per token: ``round((1 - sparsity) d)``, at least one."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return max(1, min(d, round((1.0 - sparsity) * d)))


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but the k largest |x| of each row (last dim) zeroed."""
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def rotated_input(x: torch.Tensor, q: torch.Tensor | None, k: int) -> torch.Tensor:
    """``(x Q)_topk Q^T`` (``x_topk`` without Q), computed in fp32, returned in x's dtype."""
    xf = x.float()
    if q is None:
        return topk_mask(xf, k).to(x.dtype)
    qf = q.to(device=x.device, dtype=torch.float32)
    return (topk_mask(xf @ qf, k) @ qf.T).to(x.dtype)


@contextlib.contextmanager
def rotated_topk(model: torch.nn.Module, sites: list[SiteRecord], rotations: dict[str, torch.Tensor],
                 sparsity: float):
    """Apply rotated (or, without a rotation, plain) fixed-k top-k to every masked linear input.

    ``rotations`` maps a group (its first module) to Q; one masked copy serves the whole group,
    as the backend shares one mask among q/k/v and among gate/up.
    """
    mods = dict(model.named_modules())
    handles = []
    for group, members in groups(sites).items():
        q = rotations.get(group)
        k = keep_count(members[0].in_features, sparsity)
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(mod, args, q=q, k=k, cache=cache, first=group):
            x = args[0]
            if mod is mods[first] or "x" not in cache or cache["x"][0] is not x:
                cache["x"] = (x, rotated_input(x, q, k))
            return (cache["x"][1],) + args[1:]

        for s in members:
            handles.append(mods[s.module].register_forward_pre_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
