"""Backend options: parsed and validated once, with messages that say what is allowed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..plan import SparsityPlan

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: The sparsity of the calibration-free default (``backend="sparse"`` with no plan): statistical
#: top-k on every linear input, conservative enough to keep perplexity within a few percent on
#: the offline models (README, "Accuracy").
DEFAULT_SPARSITY = 0.25
RELAYOUTS = ("lazy", "off")
COMPILERS = ("inductor", "eager")

# name -> (accepted types, description)
_SPEC: dict[str, tuple[tuple[type, ...], str]] = {
    "plan": ((SparsityPlan, str, os.PathLike), "a SparsityPlan or the path of a saved plan"),
    "sparsity": ((float, int), "a target in [0, 1) for statistical top-k when no plan is given"),
    "cudagraphs": ((bool,), "True to run the compiled graph under CUDA graphs"),
    "debug": ((bool,), "True to print the table of sites and the rule applied to each"),
    "relayout": ((str,), f"how masked weights become input-major: one of {RELAYOUTS}"),
    "inductor": ((dict,), "extra Inductor config patches, passed to compile_fx"),
    "gqa_attention": ((bool,), "True (default) to let SDPA read the KV cache per KV head instead of "
                               "Hugging Face's repeated copies; False keeps the traced attention"),
    "fuse_gated_product": ((bool, str), "'auto' (default: on CUDA weights only, where it saves a launch; on "
                                         "the CPU Inductor's fused product is faster), True or False to compute "
                                         "a gated MLP's act(gate) * up inside its masked gate/up call always or "
                                         "never"),
    "compiler": ((str,), f"what compiles the rewritten graph: one of {COMPILERS} "
                         "('eager' runs it uncompiled: for debugging and fast tests)"),
}


class OptionsError(ValueError):
    """Bad backend options: unknown key, wrong type or value."""


@dataclass
class BackendOptions:
    plan: SparsityPlan
    cudagraphs: bool = False
    debug: bool = False
    relayout: str = "lazy"
    mode: str | None = None
    inductor: dict[str, Any] = field(default_factory=dict)
    compiler: str = "inductor"
    gqa_attention: bool = True
    fuse_gated_product: bool | str = "auto"
    plan_was_default: bool = False

    @property
    def default_note(self) -> str:
        """The one warning a compilation without a plan gives."""
        st = self.plan.stat_topk
        return (f"actsparse: no plan given; using calibration-free statistical top-k at sparsity "
                f"{st.sparsity:g} on every linear input (options={{'sparsity': s}} sets it; "
                "actsparse.calibrate makes a plan that keeps more accuracy at higher sparsity)")

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, mode: str | None = None) -> BackendOptions:
        options = dict(options or {})
        unknown = sorted(set(options) - set(_SPEC))
        if unknown:
            allowed = "; ".join(f"{k}: {d}" for k, (_, d) in _SPEC.items())
            raise OptionsError(f"unknown backend option(s) {unknown}; allowed: {allowed}")
        for key, value in options.items():
            types, desc = _SPEC[key]
            if isinstance(value, bool) and bool not in types:
                raise OptionsError(f"option {key!r} must be {desc}, got {value!r}")
            if not isinstance(value, types):
                raise OptionsError(f"option {key!r} must be {desc}, got {type(value).__name__}")
        if mode not in MODES:
            raise OptionsError(f"mode {mode!r} is not supported; allowed: {MODES}")
        relayout = options.get("relayout", "lazy")
        if relayout not in RELAYOUTS:
            raise OptionsError(f"option 'relayout' must be one of {RELAYOUTS}, got {relayout!r}")
        fuse = options.get("fuse_gated_product", "auto")
        if isinstance(fuse, str) and fuse != "auto":
            raise OptionsError(f"option 'fuse_gated_product' must be 'auto', True or False, got {fuse!r}")
        compiler = options.get("compiler", "inductor")
        if compiler not in COMPILERS:
            raise OptionsError(f"option 'compiler' must be one of {COMPILERS}, got {compiler!r}")
        inductor = dict(options.get("inductor", {}))
        if inductor:
            import torch._inductor.config as inductor_config

            known = inductor_config.get_config_copy()
            bad = sorted(k for k in inductor if not isinstance(k, str) or k not in known)
            if bad:
                raise OptionsError(f"option 'inductor' has keys Inductor does not know: {bad}; allowed: "
                                   "the names in torch._inductor.config (e.g. 'max_autotune', "
                                   "'triton.cudagraphs')")
        plan = options.get("plan")
        sparsity = options.get("sparsity")
        if plan is not None and sparsity is not None:
            raise OptionsError("give either 'plan' or 'sparsity', not both "
                               "('sparsity' is the statistical top-k used when there is no plan)")
        default = False
        if plan is None:
            if sparsity is None:
                sparsity, default = DEFAULT_SPARSITY, True
            if not 0.0 <= float(sparsity) < 1.0:
                raise OptionsError(f"option 'sparsity' must be in [0, 1), got {sparsity}")
            plan = SparsityPlan.statistical(float(sparsity))
        elif not isinstance(plan, SparsityPlan):
            plan = SparsityPlan.load(plan)
        cudagraphs = bool(options.get("cudagraphs", False)) or mode == "reduce-overhead"
        return cls(plan=plan, cudagraphs=cudagraphs, debug=bool(options.get("debug", False)),
                   relayout=relayout, mode=mode, inductor=inductor,
                   compiler=compiler, gqa_attention=bool(options.get("gqa_attention", True)),
                   fuse_gated_product=fuse,
                   plan_was_default=default)

    def config_patches(self) -> dict[str, Any]:
        """Inductor config for the mode, plus CUDA graphs if asked for in options."""
        import torch._inductor

        patches: dict[str, Any] = {}
        if self.mode not in (None, "default"):
            patches.update(torch._inductor.list_mode_options(self.mode))
        if self.cudagraphs:
            patches["triton.cudagraphs"] = True
        patches.update(self.inductor)
        return patches
