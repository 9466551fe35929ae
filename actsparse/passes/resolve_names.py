"""Map the module names a graph's sites carry to the plan's (model-rooted) names.

Names match exactly when the whole model was traced as one graph. A graph traced from a
submodule's frame (a compiled submodule, or a graph break inside a decoder layer) names its
modules relative to that submodule; such a graph is mapped only if one prefix makes every one
of its names a module of the plan's model. A decoder layer's frame fits every layer equally
(and Dynamo reuses its graph across layers), so it stays unmapped, dense, and its rules are
reported as not found.
"""

from __future__ import annotations

from ..plan import SparsityPlan
from .find_sites import Site


def resolve_names(sites: list[Site], plan: SparsityPlan) -> dict[str, str]:
    """Each site's graph module name -> the plan's name for it (absent where none fits)."""
    known = set((plan.model or {}).get("weights", {})) or plan.rule_names()
    names = [s.module for s in sites]
    # a head tied to the input embedding is traced under the embedding's name (calibration.lm_head)
    tied = (plan.info.get("lm_head") or {}).get("traced_as")
    alias = {tied: plan.info["lm_head"]["module"]} if tied else {}
    if any(n in known for n in names):  # rooted at the model (a tied head may not be linear)
        return {n: alias.get(n, n) for n in names if n in known or n in alias}
    prefixes: set[str] | None = None
    for n in names:
        cands = {k[: -len(n)] for k in known if k.endswith("." + n)}
        if cands:
            prefixes = cands if prefixes is None else prefixes & cands
    if prefixes and len(prefixes) == 1:
        p = prefixes.pop()
        return {n: p + n for n in names}
    return {}
