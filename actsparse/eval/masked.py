"""Apply a plan eagerly with module hooks: an independent reference for the compiled model.

``masked(model, plan)`` makes the eager model compute what the plan prescribes, without the
backend's passes or ops: the tests compare the compiled model with it, the GPU checks do the
same on real shapes, and it evaluates a plan quickly where compiling is not wanted.
"""

from __future__ import annotations

import contextlib

import torch

from ..ops.reference import lowrank_complement_reference, route_heads_reference, selected_heads, wina_cutoffs
from ..plan import ROLES, HeadRouting, SparsityPlan
from ..plan.rules.rsparse import LowRankSparse


@contextlib.contextmanager
def masked(model: torch.nn.Module, plan: SparsityPlan):
    """Apply ``plan`` to ``model`` eagerly with hooks, for the duration of the block.

    TEAL thresholds: a forward pre-hook masks the module's input. CATS thresholds: a forward
    hook on the MLP's activation module masks ``act(gate)``, so ``act * up`` is masked too.
    Statistical top-k: pre-hooks with the per-token cutoff on every non-head linear of its roles
    that no fixed threshold or CATS rule covers.
    WINA plans (``score == "wina"``): the pre-hook's cutoff is per channel, ``t / ||W[:, i]||``.
    Head routing: a pre-hook on q_proj keeps the block input, one on o_proj zeroes the heads of
    the units the router did not pick for each token (before any other hook sees them).
    Sparse + low-rank (rsparse): a pre-hook masks the input at the rule's threshold and keeps
    the unmasked input, and a forward hook adds ``A (B (x * (|x| <= t)))`` to the output.
    """
    handles = []
    mods = dict(model.named_modules())

    def teal(t):
        def hook(mod, args):
            x = args[0]
            return (torch.where(x.abs().float() > t, x, torch.zeros((), dtype=x.dtype)),) + args[1:]
        return hook

    def stat(z):
        def hook(mod, args):
            x = args[0]
            scale = x.float().abs().mean(-1, keepdim=True)
            return (torch.where(x.abs().float() > z * scale, x, torch.zeros((), dtype=x.dtype)),) + args[1:]
        return hook

    def act_mask(t):
        def hook(mod, args, out):
            return torch.where(out.abs().float() > t, out, torch.zeros((), dtype=out.dtype))
        return hook

    for name, t in plan.thresholds.items():
        if plan.score == "wina":
            w = mods[name].weight
            t = wina_cutoffs(w if isinstance(mods[name], torch.nn.Linear) else w.t(), t)
        handles.append(mods[name].register_forward_pre_hook(teal(t)))
    for down, t in plan.activation_thresholds.items():
        mlp = mods[down.rsplit(".", 1)[0]]
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "act", None) or getattr(mlp, "activation_fn", None)
        if act is None or not hasattr(mlp, "gate_proj"):  # plain MLP: mask the down input
            handles.append(mods[down].register_forward_pre_hook(teal(t)))
        else:
            handles.append(act.register_forward_hook(act_mask(t)))
    st = plan.stat_topk
    if st is not None and st.sparsity > 0:
        head = model.get_output_embeddings()
        taken = set(plan.thresholds)  # a fixed threshold, or a CATS MLP, takes precedence (as the pass does)
        for down in plan.activation_thresholds:
            mlp = mods[down.rsplit(".", 1)[0]]
            taken |= {down} | {f"{down.rsplit('.', 1)[0]}.{p}" for p in ("gate_proj", "up_proj") if hasattr(mlp, p)}
        roles = None if set(st.roles) >= set(ROLES) else _site_roles(model)
        for name, mod in mods.items():
            if (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D") and mod is not head \
                    and name not in taken and (roles is None or roles.get(name) in st.roles):
                handles.append(mod.register_forward_pre_hook(stat(st.multiplier)))
    rs = plan.rule(LowRankSparse)
    for name, spec in (rs.specs.items() if rs is not None else ()):
        a, b = rs.factors.get(f"{name}.a"), rs.factors.get(f"{name}.b")
        handles += _sparse_lowrank(mods[name], teal(spec["threshold"]), spec["threshold"], a, b)
    heads = plan.rule(HeadRouting)
    for o_name, spec in (heads.specs.items() if heads is not None else ()):
        handles += _route_heads(mods, o_name, spec, heads.weights[f"{o_name}.w"], heads.weights[f"{o_name}.b"])
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _sparse_lowrank(mod, mask_hook, threshold, a, b):
    """The rsparse hooks of one linear: mask its input, add the low-rank term of the rest."""
    kept = {}

    def pre(m, args):
        kept["x"] = args[0]
        return mask_hook(m, args)

    def post(m, args, out):
        x = kept.pop("x")
        if a is None:
            return out
        return out + lowrank_complement_reference(x, a.to(x.device, x.dtype), b.to(x.device, x.dtype), threshold)

    return [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]


def _site_roles(model: torch.nn.Module) -> dict[str, str]:
    """Each linear's site role, from the backend's own site discovery (traces the model once)."""
    from ..calibration.sites import trace_sites  # calibration reads eval's data: imported on use

    return {s.module: s.role for s in trace_sites(model)}


def _route_heads(mods, o_name, spec, w, b):
    seen = {}

    def keep_input(mod, args):
        seen["x"] = args[0]

    def zero_heads(mod, args):
        h = args[0]  # [B, T, Hq * D]
        x = seen["x"]
        units = route_heads_reference(x, w.to(x.device), b.to(x.device), spec["keep"])
        lead = h.shape[:-1]
        units = units.reshape(-1, 1, spec["keep"])  # one token per row
        keep = selected_heads(units, units.shape[0], 1, spec["num_heads"], spec["heads_per_unit"])  # [N, Hq, 1]
        keep = keep[:, :, 0].repeat_interleave(spec["head_dim"], dim=1).reshape(*lead, -1)
        return (torch.where(keep, h, torch.zeros((), dtype=h.dtype)),) + args[1:]

    return [mods[spec["q_proj"]].register_forward_pre_hook(keep_input, prepend=True),
            mods[o_name].register_forward_pre_hook(zero_heads, prepend=True)]
