"""Predictor insertion: rewrite the gated MLPs a plan gives predictors into predicted-sparse ops.

For each gated MLP ``down(act(gate(x)) * up(x))`` whose down projection has a predictor in the
plan, the pass inserts

    mask = actsparse::predict_mask(x, key, n, keep, threshold, topk)     # the predictor
    out  = actsparse::predicted_mlp(x, mask, w_gate, w_up, w_down, ...)  # only predicted rows

The predictor's weights are registered with the op under ``key`` (cast to the MLP weights'
device and dtype) instead of entering the graph, so Dynamo's graph needs nothing from the
model: the one-line ``torch.compile(model, backend="sparse", options={"plan": plan})`` works
as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..kernels.predicted_ops import predict_mask_op, predicted_mlp_op, register_predictor
from ..plan import PlanError, SparsityPlan
from .insert_masks import _erase_orphans, resolve_names
from .sites import Site


@dataclass
class PredictorStats:
    """What the predictor pass did: counts for tests, names for the unfound-rule report."""

    predicted_mlp_calls: int = 0
    found_rules: set[str] = field(default_factory=set)


def _value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


_CAST: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _registered(plan: SparsityPlan, pname: str, device: torch.device, dtype: torch.dtype) -> str:
    """Register the predictor's tensors (cast once per plan tensor, device and dtype); its key."""
    src = tuple(plan.predictor_tensors[f"{pname}.{p}"] for p in ("w1", "w2", "b2"))
    key = f"{pname}@{id(src[0]):x}:{device}:{dtype}".replace("torch.", "")
    hit = _CAST.get((key,))
    if hit is None or hit[0] is not src[0]:
        cast = tuple(t.detach().to(device=device, dtype=dtype).contiguous() for t in src)
        _CAST[(key,)] = (src[0],)
        register_predictor(key, *cast)
    return key


def _reserve_down_buffers(device: torch.device, neurons: int, d_out: int) -> None:
    """The down projection's split-K workspace, sized now, before CUDA graphs warm up in a pool."""
    from ..kernels.triton import is_available

    if is_available():
        from ..kernels.triton.sparse_gemv import reserve_buffers

        reserve_buffers(device, neurons, [d_out])


def insert_predictors(gm: fx.GraphModule, sites: list[Site], plan: SparsityPlan) -> PredictorStats:
    """Rewrite ``gm`` in place for the plan's predictors; returns what was done."""
    stats = PredictorStats()
    if not plan.predictors:
        return stats
    graph = gm.graph
    names = resolve_names(sites, plan)
    orphans: list[fx.Node] = []
    for s in sites:
        pname = names.get(s.module)
        if s.role != "mlp_down" or pname not in plan.predictors:
            continue
        spec = plan.predictors[pname]
        stats.found_rules.add(pname)
        if not s.gated:
            raise PlanError(f"predictor for {pname!r}: its MLP is not gated (down(act(gate x) * up x)); "
                            "predictors support gated MLPs only")
        gate, up = s.gated["gate"], s.gated["up"]
        if s.node.graph is not graph or gate.node.graph is not graph or up.node.graph is not graph:
            raise PlanError(f"predictor for {pname!r}: its MLP was already rewritten by another rule")
        prefix = pname[: len(pname) - len(s.module)]  # the graph's names may be relative to a submodule
        if (names.get(gate.module, prefix + gate.module), names.get(up.module, prefix + up.module)) \
                != (spec["gate"], spec["up"]):
            raise PlanError(f"predictor for {pname!r} was made for gate/up {spec['gate']}, {spec['up']}; "
                            f"the graph's MLP has {prefix + gate.module}, {prefix + up.module}")
        if (gate.out_features, gate.in_features) != (spec["neurons"], spec["in_features"]):
            raise PlanError(f"predictor for {pname!r} was made for an MLP of {spec['in_features']} inputs and "
                            f"{spec['neurons']} neurons; the graph's gate is {gate.in_features} -> "
                            f"{gate.out_features}")
        w = _value(gate.weight)
        device = w.device if isinstance(w, torch.Tensor) else torch.device("cpu")
        dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
        key = _registered(plan, pname, device, dtype)
        if device.type == "cuda":
            _reserve_down_buffers(device, s.in_features, s.out_features)
        topk = spec["selection"] == "topk"
        hint = float(plan.measured.get(pname, plan.target or 0.0) or 0.0)
        with graph.inserting_before(s.node):
            mask = graph.call_function(predict_mask_op, (gate.input, key, int(spec["neurons"]), int(spec["keep"]),
                                                         float(spec["threshold"]), topk))
            new = graph.call_function(predicted_mlp_op, (
                gate.input, mask, gate.weight, up.weight, s.weight, gate.bias, up.bias, s.bias,
                s.act, hint))
        new.meta.update(s.node.meta)
        s.node.replace_all_uses_with(new)
        orphans.extend(s.node.all_input_nodes)
        graph.erase_node(s.node)
        sel = f"top-{spec['keep']}" if topk else f"logit>{spec['threshold']:.3g}"
        for x in (gate, up, s):
            x.rule = f"predictor r={spec['rank']} {sel}/{spec['neurons']}"
        stats.predicted_mlp_calls += 1
    _erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()
    return stats
