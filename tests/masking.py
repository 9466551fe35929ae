"""Independent eager references for tests: masks applied by module hooks, not by the passes."""

from __future__ import annotations

import contextlib

import torch
from transformers import StaticCache

from actsparse.plan import SparsityPlan


@contextlib.contextmanager
def masked(model: torch.nn.Module, plan: SparsityPlan):
    """Apply ``plan`` to ``model`` eagerly with hooks, for the duration of the block.

    TEAL thresholds: a forward pre-hook masks the module's input. CATS thresholds: a forward
    hook on the MLP's activation module masks ``act(gate)``, so ``act * up`` is masked too.
    Statistical top-k: pre-hooks with the per-token cutoff on every non-head linear.
    WINA plans (``score == "wina"``): the pre-hook's cutoff is per channel, ``t / ||W[:, i]||``.
    """
    from actsparse.ops.reference import wina_cutoffs

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
    if plan.stat_topk is not None:
        head = model.get_output_embeddings()
        for name, mod in mods.items():
            if (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D") and mod is not head:
                handles.append(mod.register_forward_pre_hook(stat(plan.stat_topk.multiplier)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def prefill_decode(fwd, model, ids: torch.Tensor, decode: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill over ``ids`` then one decode step per column of ``decode``.

    The decode tokens are given (not argmax) so that two models that differ by rounding still
    see the same inputs.
    """
    b, n = ids.shape
    steps = decode.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 1)
    outs = []
    with torch.no_grad():
        out = fwd(input_ids=ids, past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(n))
        outs.append(out.logits)
        for i in range(steps):
            out = fwd(input_ids=decode[:, i:i + 1], past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([n + i]))
            outs.append(out.logits)
    return outs


def linear_names(model: torch.nn.Module) -> list[str]:
    """Every linear-like module except the output head: the sites a plan may mask."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head]
