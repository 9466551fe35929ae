"""Models that come sparse: lower a gated MLP's built-in statistical top-k to the sparse kernel.

Gemma 3n's MLP (``activation_sparsity_pattern`` in its config) thresholds its gate before the
activation, as Hugging Face traces it::

    g = gate(x);  c = mean(g, -1) + std(g, -1) * icdf(p)      # a per-token Gaussian cutoff
    down(act(relu(g - c)) * up(x))

``relu`` leaves exact zeros and ``act(0) == 0`` for every activation we know, so the down
projection's input is zero wherever the gate fell under its cutoff: about a fraction p of the
neurons. With no plan at all this pass gives the MLP its roles (``find_sites`` stops at the
reductions) and lowers the down projection to ``actsparse::sparse_linear`` with threshold 0,
which skips exactly those zeros: no calibration, no change in the result. The gate is needed
in full (its statistics decide); the up projection's rows could be skipped too, which needs a
gated op taking the thresholded gate (none yet).

A plan rule on the down projection (a threshold, or a CATS rule: a plain MLP's down input)
keeps precedence: ``|h| > t`` with t >= 0 already skips the zeros. Without one, the built-in
rule also beats a statistical top-k default on that input (it is exact and sparser).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ops.sparse_linear import sparse_linear as sparse_linear_op
from .context import PassContext
from .find_sites import Site, activation_of
from .graph import erase_orphans, run_dense, static_rows

_MUL = {operator.mul, torch.mul}
_ADD = {operator.add, torch.add}
_SUB = {operator.sub, torch.sub}
_RELU = {F.relu, torch.relu}
_CASTS = {"type", "to", "float", "type_as"}


@dataclass
class BuiltinTopK:
    """One matched MLP: its three sites, the activation and the built-in target sparsity."""

    gate: Site
    up: Site
    down: Site
    act: str
    sparsity: float | None  # p of the cutoff icdf(p); None where it is not a constant


def _fn(node: object, targets: set, method: str | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    return method is not None and node.op == "call_method" and node.target == method


def _last_dim_reduction(node: object, of: fx.Node, name: str) -> bool:
    """``torch.<name>(of, dim=-1, keepdim=True)`` (``std`` also without Bessel's correction)."""
    if not isinstance(node, fx.Node) or not node.args or node.args[0] is not of:
        return False
    fn = getattr(torch, name)
    if not ((node.op == "call_function" and node.target is fn) or (node.op == "call_method" and node.target == name)):
        return False
    kw = node.kwargs
    dim = kw.get("dim", node.args[1] if len(node.args) > 1 else None)
    rank = len(_shape(of) or ())
    if dim not in (-1, rank - 1, (-1,), [-1]) or not kw.get("keepdim", False):
        return False
    if name == "std":
        return kw.get("unbiased", True) is False or kw.get("correction", 1) == 0
    return True


def _shape(node: fx.Node):
    v = node.meta.get("example_value", node.meta.get("val"))
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _constant(node: object, depth: int = 0):
    """The value of a scalar expression that reads no graph input (the icdf of a literal), or None."""
    if not isinstance(node, fx.Node):
        return node
    if depth > 32 or node.op not in ("call_function", "call_method"):
        raise LookupError(node.name)
    args = [_constant_arg(a, depth) for a in node.args]
    kwargs = {k: _constant_arg(v, depth) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _constant_arg(a, depth):
    if isinstance(a, (list, tuple)):
        return type(a)(_constant_arg(x, depth) for x in a)
    return _constant(a, depth + 1) if isinstance(a, fx.Node) else a


def _multiplier(node: object) -> float | None:
    """The float a cutoff's std is multiplied by, evaluated from the graph if it is constant."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            v = _constant(node)
    except Exception:  # not a constant expression (or not one we can evaluate): unknown p
        return None
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not isinstance(v, torch._subclasses.FakeTensor):
        v = float(v)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _cutoff_sparsity(c: fx.Node, g: fx.Node) -> tuple[bool, float | None]:
    """Is ``c`` ``mean(g) + std(g) * m`` (any order)? Then also p = Phi(m), if m is constant."""
    if not _fn(c, _ADD, "add") or len(c.args) != 2:
        return False, None
    for mean, scaled in (c.args, c.args[::-1]):
        if not _last_dim_reduction(mean, g, "mean") or not _fn(scaled, _MUL, "mul") or len(scaled.args) != 2:
            continue
        for std, m in (scaled.args, scaled.args[::-1]):
            if _last_dim_reduction(std, g, "std"):
                mult = _multiplier(m)
                return True, None if mult is None else 0.5 * (1.0 + math.erf(mult / math.sqrt(2.0)))
    return False, None


def _strip_casts(n: object) -> object:
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target in _CASTS and n.args:
        n = n.args[0]
    return n


def match(down: Site, by_node: dict[fx.Node, Site]) -> BuiltinTopK | None:
    """``down(act(relu(gate(x) - cutoff)) * up(x))`` with a Gaussian top-k cutoff, or None."""
    h = down.input
    if down.kind != "linear" or not _fn(h, _MUL, "mul") or len(h.args) != 2:
        return None
    for a, u in (h.args, h.args[::-1]):
        a, u = _strip_casts(a), _strip_casts(u)
        up = by_node.get(u) if isinstance(u, fx.Node) else None
        act = activation_of(a) if isinstance(a, fx.Node) else None
        if up is None or act is None or not a.args:
            continue
        r = _strip_casts(a.args[0])
        if not _fn(r, _RELU, "relu") or not r.args:
            continue
        d = r.args[0]
        if not _fn(d, _SUB, "sub") or len(d.args) != 2:
            continue
        gate = by_node.get(d.args[0]) if isinstance(d.args[0], fx.Node) else None
        if gate is None or gate.kind != "linear" or gate.input is not up.input or gate is up:
            continue
        ok, p = _cutoff_sparsity(d.args[1], gate.node)
        if ok:
            return BuiltinTopK(gate=gate, up=up, down=down, act=act, sparsity=p)
    return None


def lower_builtin_topk(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Give built-in top-k MLPs their roles and lower their down projections (exact zeros)."""
    by_node = {s.node: s for s in ctx.sites}
    found = [m for m in (match(s, by_node) for s in ctx.sites) if m is not None]
    if not found:
        return
    graph = gm.graph
    orphans: list[fx.Node] = []
    plan = ctx.plan
    for m in found:
        m.gate.role = m.up.role = "mlp_in"
        m.down.role, m.down.act = "mlp_down", m.act
        pname = ctx.names.get(m.down.module)
        if pname in plan.thresholds or pname in plan.activation_thresholds or m.down.rewritten:
            continue  # the plan's own rule on this input (insert_masks) already skips the zeros
        s = m.down
        p = m.sparsity if m.sparsity is not None else 0.5
        label = f"builtin gaussian-topk p={p:.3g}" if m.sparsity is not None else "builtin gaussian-topk"
        if run_dense(s.input, s.in_features, [s.out_features], p):
            s.rule = f"{label} (dense, {static_rows(s.input)} rows)"  # the dense linear already skips nothing
            s.rewritten = True
            continue
        with graph.inserting_before(s.node):
            call = graph.call_function(sparse_linear_op, (s.input, [s.weight], [s.bias], [0.0], False, p))
            item = graph.call_function(operator.getitem, (call, 0))
        item.meta.update(s.node.meta)
        s.node.replace_all_uses_with(item)
        orphans.extend(s.node.all_input_nodes)
        graph.erase_node(s.node)
        s.rewritten = True
        s.rule = f"{label} t=0 (exact)"
        ctx.stats.sparse_linear_calls += 1
        ctx.stats.masked_sites += 1
    erase_orphans(graph, orphans)
    graph.lint()
    gm.recompile()
