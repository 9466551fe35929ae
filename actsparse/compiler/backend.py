"""The ``sparse`` torch.compile backend.

``torch.compile(model, backend="sparse", options={"plan": plan})`` reaches ``sparse_backend``
through the ``torch_dynamo_backends`` entry point; ``actsparse.backend(plan, cudagraphs=True)``
builds the same thing as a callable for callers that cannot pass ``mode`` with ``options``.
Each Dynamo graph goes through the pass pipeline and then to Inductor's ``compile_fx``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import ops
from ..passes.pipeline import run_passes
from ..plan import SparsityPlan
from .layout import is_input_major, to_input_major
from .options import BackendOptions

log = logging.getLogger("actsparse")


class SparseBackend:
    """A configured backend: options plus what its compilations found so far."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.found_rules: set[str] = set()
        self.graphs = 0
        self.sites: list[Any] = []  # every site of every graph compiled, with its rule
        self.masked_sites = 0  # sites rewritten into actsparse ops, over all graphs
        self._warned_no_sites = False
        self._announced = False
        self._last_missing: frozenset[str] | None = None

    @property
    def plan(self) -> SparsityPlan:
        return self.options.plan

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        opts = self.options
        self.graphs += 1
        if opts.plan_was_default and not self._announced:
            self._announced = True
            warnings.warn(opts.default_note, stacklevel=2)
        # constants a pass registered are tied to the compiled graph at the end; if anything in
        # between raises, none is returned to hold them, so they are released here
        with ops.constants.released_on_error():
            result = run_passes(gm, opts.plan, gqa_attention=opts.gqa_attention,
                                fuse_gated_product=opts.fuse_gated_product)
            self.sites.extend(result.sites)
            self.masked_sites += result.stats.masked_sites
            self.found_rules |= result.stats.found_rules
            if not result.sites:
                if not self._warned_no_sites:
                    self._warned_no_sites = True
                    warnings.warn("actsparse: no linear layer found in the traced graph; it is "
                                  "compiled densely by Inductor", stacklevel=2)
            else:
                self._report_unresolved(result)
                self._report_missing()
            if opts.debug:
                print(f"actsparse: graph {self.graphs}\n{result.table}")
            for node in gm.graph.nodes:  # kernel workspaces, sized before CUDA graphs warm up in a pool
                ops.reserve(node)
            if opts.compiler == "eager":
                compiled = gm.forward
            else:
                compiled = compile_fx(gm, example_inputs, config_patches=opts.config_patches())
            relayout = [example_inputs[i] for i in result.input_major_inputs
                        if isinstance(example_inputs[i], torch.nn.Parameter)
                        and not is_input_major(example_inputs[i])]
            if opts.relayout == "lazy" and relayout:
                compiled = _relayout_after_first_call(compiled, relayout)
            if result.constants.keys:
                compiled = _holding(compiled)
                result.constants.bind(compiled)  # the constants live as long as this compiled graph
            return compiled

    def _report_unresolved(self, result) -> None:
        """A graph whose module names fit several places of the model runs dense: say so."""
        names = result.stats.unresolved
        if names and result.stats.masked_sites == 0 and self.plan.rule_names() and \
                len(names) > 1 and not all(s.role == "other" for s in result.sites):
            warnings.warn(
                f"actsparse: graph {self.graphs} was traced from a submodule (a graph break inside "
                f"the model?) and its layers ({', '.join(names[:4])}, ...) fit several places of "
                "the model, so it runs dense; compile with fullgraph=True to find the break",
                stacklevel=3)

    def _report_missing(self) -> None:
        missing = frozenset(self.plan.rule_names() - self.found_rules)
        if missing and missing != self._last_missing:
            names = sorted(missing)
            shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
            warnings.warn(
                f"actsparse: {len(names)} plan rule(s) not found in the {self.graphs} graph(s) "
                f"compiled so far (graph breaks or unsupported patterns leave them dense): {shown}",
                stacklevel=3)
        self._last_missing = missing


def _holding(compiled: Callable) -> Callable:
    """A callable of our own around ``compiled``, to tie the graph's constants to its lifetime."""
    def run(*args):
        return compiled(*args)

    return run


def _relayout_after_first_call(compiled: Callable, params: list[torch.nn.Parameter]) -> Callable:
    """Run the graph once as compiled, then store its masked weights input-major.

    Dynamo guards on parameter strides, so the layout cannot change while a graph is being
    compiled; changing it after the first call makes the next call recompile once, with the
    fast layout. ``actsparse.prepare(model, plan)`` does it ahead and saves that recompile.

    Only after a call whose outputs need no gradient: a grad-mode call's backward graph still
    reads the weights with the strides it was compiled for (Inductor asserts them), so re-storing
    them between a forward and its backward would break ``loss.backward()``.
    """
    state = {"done": False}

    def run(*args):
        out = compiled(*args)
        if not state["done"] and not _needs_grad(out):
            state["done"] = True
            n = sum(to_input_major(p) for p in params)
            log.info("actsparse: %d weights re-stored input-major; the next call recompiles", n)
        return out

    return run


def _needs_grad(out: Any) -> bool:
    """Whether a graph's outputs carry an autograd graph (a backward may still come)."""
    leaves = torch.utils._pytree.tree_leaves(out)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)


def sparse_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                   mode: str | None = None, options: dict[str, Any] | None = None) -> Callable:
    """Entry point for ``backend="sparse"``: validate options, then compile."""
    return _backend_for(BackendOptions.parse(options, mode))(gm, example_inputs)


# One SparseBackend per plan object, so that graphs compiled for the same plan (graph breaks,
# prefill and decode) share what they found when reporting missing rules. The default plan
# (no plan, no sparsity) is made anew by each parse, so it is keyed by its sparsity instead:
# its note is given once, not once per graph.
_BACKENDS: dict[Any, tuple[SparsityPlan, SparseBackend]] = {}
_MAX_BACKENDS = 16


def _backend_for(options: BackendOptions) -> SparseBackend:
    if options.plan_was_default:
        key: Any = ("default", options.plan.stat_topk.sparsity)
        hit = _BACKENDS.get(key)
        if hit is not None:
            hit[1].options = dataclasses.replace(options, plan=hit[0])
            return hit[1]
    else:
        key = id(options.plan)
        hit = _BACKENDS.get(key)
        if hit is not None and hit[0] is options.plan:
            hit[1].options = options
            return hit[1]
    be = SparseBackend(options)
    _BACKENDS[key] = (options.plan, be)
    while len(_BACKENDS) > _MAX_BACKENDS:  # keep the recent ones: a long session compiles many plans
        del _BACKENDS[next(iter(_BACKENDS))]
    return be


def backend(plan: SparsityPlan | str | None = None, *, sparsity: float | None = None,
            cudagraphs: bool = False, debug: bool = False, relayout: str = "lazy",
            mode: str | None = None, inductor: dict[str, Any] | None = None,
            compiler: str = "inductor", gqa_attention: bool = True,
            fuse_gated_product: bool | str = "auto") -> SparseBackend:
    """A backend object for ``torch.compile(model, backend=actsparse.backend(plan, ...))``."""
    options: dict[str, Any] = {"cudagraphs": cudagraphs, "debug": debug, "relayout": relayout,
                               "compiler": compiler, "gqa_attention": gqa_attention,
                               "fuse_gated_product": fuse_gated_product}
    if plan is not None:
        options["plan"] = plan
    if sparsity is not None:
        options["sparsity"] = sparsity
    if inductor:
        options["inductor"] = inductor
    return SparseBackend(BackendOptions.parse(options, mode))
