"""Site discovery: find every linear layer in a Dynamo graph and what role its input plays.

Sites are found from the graph alone, never from model-specific code: a ``linear`` (or an
``addmm`` for GPT-2's Conv1D, whose weight is stored transposed) whose weight is a graph
placeholder that Dynamo lifted from a module parameter. Roles come from the graph's shape:

* ``mlp_down``: the linear whose input is computed only by pointwise ops from the outputs of
  linears that share one input (``down(act(gate(x)) * up(x))``, ``fc2(act(fc1(x)))``);
  those producers are ``mlp_in``.
* ``attn_out``: the linear whose input comes (through reshapes) from an attention op.
* ``attn_in``: a linear whose output flows into an attention op (q/k/v, fused qkv).
* ``other``: the rest (the LM head, for one); never masked unless a plan names it.

Under tensor parallelism the weight is the local shard of a DTensor parameter,
``p.to_local()`` (see ``dtensor.py``; ``localize_dtensor`` brings PyTorch's DTensor linears to
that form first): the site's shapes are the local ones, ``shard`` says how it is split and
``global_shape`` is the parameter's, the one a plan knows.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..ops.quant_linear import quant_linear as _QUANT_LINEAR
from ..plan.sharding import Shard
from ..quant.torchao_weights import is_torchao_weight
from .dtensor import local_weight, value_of

_LINEAR_TARGETS = {torch._C._nn.linear, F.linear}
_ADDMM_TARGETS = {torch.addmm, torch.ops.aten.addmm.default}
_ATTENTION_TARGETS = {F.scaled_dot_product_attention, torch.matmul, torch.bmm, torch.baddbmm,
                      operator.matmul}

# Ops that do not mix tokens or channels beyond elementwise math and reshapes: an MLP's
# inner path is made only of these between its input linears and its down projection.
_POINTWISE_FUNCS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    operator.getitem,
    torch.mul, torch.add, torch.sub, torch.tanh, torch.sigmoid, torch.pow, torch.relu,
    torch.exp, torch.erf, torch.neg, torch.chunk, torch.split, torch.where, torch.clamp,
    F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, F.leaky_relu, F.relu6, F.hardswish, F.mish,
}
_POINTWISE_METHODS = {
    "mul", "add", "sub", "div", "pow", "tanh", "sigmoid", "relu", "neg", "view", "reshape",
    "to", "float", "half", "bfloat16", "type", "type_as", "contiguous", "chunk", "split",
    "unsqueeze", "squeeze", "clamp", "exp", "erf",
}
_RESHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "to",
                    "type_as", "float"}
_RESHAPE_FUNCS = {torch.transpose, torch.reshape, torch.flatten, torch.permute}

_MODULE_RE = re.compile(r"_modules\[['\"]([^'\"]+)['\"]\]")
_BUFFER_RE = re.compile(r"_buffers\[['\"]([^'\"]+)['\"]\]")
_PARAM_RE = re.compile(r"_parameters\[['\"]([^'\"]+)['\"]\]")


@dataclass
class Site:
    """One linear layer found in a graph."""

    node: fx.Node
    module: str  # module name as in named_modules(), relative to the compiled module
    kind: str  # "linear" or "addmm" (Conv1D: weight stored [in, out])
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_features: int
    in_features: int
    role: str = "other"
    act: str | None = None  # for mlp_down of a gated MLP: the activation's name
    gated: dict[str, "Site"] = field(default_factory=dict)  # gate/up producers of a gated MLP
    rule: str = "-"  # filled by the rewrite passes, for the debug table
    rewritten: bool = False  # a rewrite pass replaced this site's linear
    param: fx.Node | None = None  # the parameter's placeholder (``weight``, or what it is the local shard of)
    shard: Shard | None = None  # tensor parallel: how the weight is split over the ranks
    global_shape: tuple[int, int] | None = None  # the parameter's [out, in] (linear) as the plan knows it
    quant: dict | None = None  # actsparse.quantize: scales/offsets nodes, bits, group_size; torchao: {"torchao": True}

    @property
    def plan_shape(self) -> tuple[int, int]:
        """The weight's shape as a plan records it (global under tensor parallelism)."""
        if self.global_shape is not None:
            return self.global_shape
        return (self.out_features, self.in_features) if self.kind == "linear" else (self.in_features, self.out_features)

    @property
    def block(self) -> int | None:
        """The first integer in the module path: the decoder block index, if any."""
        for part in self.module.split("."):
            if part.isdigit():
                return int(part)
        return None


def placeholder_module(node: fx.Node) -> tuple[str, str] | None:
    """(module name, parameter name) of a placeholder lifted from a module parameter."""
    if node.op != "placeholder":
        return None
    arg = node.meta.get("grapharg")
    src = getattr(arg, "source", None)
    if src is None:
        return None
    text = src.name() if callable(getattr(src, "name", None)) else str(getattr(src, "name", src))
    params = _PARAM_RE.findall(text)
    if not params:
        return None
    return ".".join(_MODULE_RE.findall(text)), params[-1]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("example_value", node.meta.get("val"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _quant_site(node: fx.Node) -> Site | None:
    """An ``actsparse::quant_linear`` call (``actsparse.quantize``): a linear whose weight is the
    module's quantized buffers; ``weight`` is the ``qweight`` placeholder."""
    x, qw, scales, offsets, b, bits, group = (list(node.args) + [None] * 7)[:7]
    if not isinstance(x, fx.Node) or not isinstance(qw, fx.Node) or qw.op != "placeholder":
        return None
    src = getattr(qw.meta.get("grapharg"), "source", None)
    text = "" if src is None else src.name() if callable(getattr(src, "name", None)) else str(src.name)
    if _BUFFER_RE.findall(text)[-1:] != ["qweight"] or _shape(qw) is None:
        return None
    k, cols = _shape(qw)
    return Site(node=node, module=".".join(_MODULE_RE.findall(text)), kind="linear", input=x, weight=qw,
                bias=b if isinstance(b, fx.Node) else None, out_features=cols * (2 if bits == 4 else 1),
                in_features=k, param=qw, quant={"scales": scales, "offsets": offsets, "bits": bits,
                                                "group_size": group})


def _linear_site(node: fx.Node) -> Site | None:
    if node.op != "call_function":
        return None
    if node.target is _QUANT_LINEAR:
        return _quant_site(node)
    if node.target in _LINEAR_TARGETS:
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        kind = "linear"
    elif node.target in _ADDMM_TARGETS and not node.kwargs:
        b, x, w = node.args[:3]
        kind = "addmm"
    else:
        return None
    if not isinstance(w, fx.Node) or not isinstance(x, fx.Node):
        return None
    local = local_weight(w) if kind == "linear" else None
    param, shard = local if local is not None else (w, None)
    owner = placeholder_module(param)
    shape = _shape(w)
    if owner is None or owner[1] != "weight" or shape is None or len(shape) != 2:
        return None
    out_f, in_f = (shape[0], shape[1]) if kind == "linear" else (shape[1], shape[0])
    full = tuple(value_of(param).shape) if local is not None else None
    quant = {"torchao": True} if kind == "linear" and is_torchao_weight(value_of(w)) else None
    return Site(node=node, module=owner[0], kind=kind, input=x, weight=w,
                bias=b if isinstance(b, fx.Node) else None, out_features=out_f, in_features=in_f,
                param=param, shard=shard, global_shape=full, quant=quant)


def _is_pointwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCS
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    return False


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    return node.op == "call_function" and node.target in _RESHAPE_FUNCS


def _is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ATTENTION_TARGETS


def _producers(start: fx.Node, linear_nodes: set[fx.Node]) -> set[fx.Node] | None:
    """The non-pointwise nodes that feed ``start`` through pointwise ops only.

    Returns None as soon as a producer is not one of the linear nodes: then ``start`` is not
    the inner path of an MLP.
    """
    found: set[fx.Node] = set()
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in linear_nodes:
            found.add(n)
            continue
        if not _is_pointwise(n):
            return None
        stack.extend(a for a in n.all_input_nodes)
    return found


def activation_of(node: fx.Node) -> str | None:
    """Name of the activation applied by ``node``, if it is one the gated op supports."""
    if node.op == "call_function":
        if node.target is F.silu:
            return "silu"
        if node.target in (F.relu, torch.relu):
            return "relu"
        if node.target is F.gelu:
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return "gelu_tanh" if approx == "tanh" else "gelu"
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def _gated_parts(down_in: fx.Node, by_node: dict[fx.Node, Site]) -> tuple[Site, Site, str] | None:
    """Match ``mul(act(gate(x)), up(x))`` (either order) at the down projection's input."""
    if down_in.op != "call_function" or down_in.target not in (operator.mul, torch.mul):
        return None
    if len(down_in.args) != 2 or not all(isinstance(a, fx.Node) for a in down_in.args):
        return None
    for a, b in (down_in.args, down_in.args[::-1]):
        act = activation_of(a)
        if act is None or not isinstance(a.args[0], fx.Node):
            continue
        gate, up = by_node.get(a.args[0]), by_node.get(b)
        if gate is None or up is None or gate.kind != "linear" or up.kind != "linear":
            continue
        if gate.input is up.input and len(gate.node.users) == 1 and len(a.users) == 1 \
                and len(up.node.users) == 1 and len(down_in.users) == 1:
            return gate, up, act
    return None


def _is_inplace(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def _reaches_attention(node: fx.Node, linear_nodes: set[fx.Node], limit: int = 400) -> bool:
    """Does ``node``'s output flow into an attention op before reaching another linear?

    In-place writes are followed to the readers of the tensor they write: a static KV cache
    receives k and v by ``index_copy_`` and attention reads the cache.
    """
    stack, seen = list(node.users), set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen or n in linear_nodes:
            continue
        seen.add(n)
        if _is_attention(n):
            return True
        stack.extend(n.users)
        if _is_inplace(n) and n.args and isinstance(n.args[0], fx.Node):
            stack.extend(n.args[0].users)
    return False


def _from_attention(node: fx.Node) -> bool:
    """Does ``node`` come from an attention op through reshapes only?"""
    n = node
    for _ in range(12):
        if _is_attention(n):
            return True
        if not _is_reshape(n) or not n.all_input_nodes:
            return False
        n = n.all_input_nodes[0]
    return False


def discover_sites(gm: fx.GraphModule) -> list[Site]:
    """Every linear site of ``gm`` with its role, in graph order."""
    sites = [s for s in (_linear_site(n) for n in gm.graph.nodes) if s is not None]
    by_node = {s.node: s for s in sites}
    linear_nodes = set(by_node)
    for s in sites:
        prods = _producers(s.input, linear_nodes)
        if prods and s.node not in prods:
            inputs = {by_node[p].input for p in prods}
            if len(inputs) == 1:
                s.role = "mlp_down"
                for p in prods:
                    by_node[p].role = "mlp_in"
                gated = _gated_parts(s.input, by_node)
                if gated is not None:
                    s.gated = {"gate": gated[0], "up": gated[1]}
                    s.act = gated[2]
    for s in sites:
        if s.role != "other":
            continue
        if _from_attention(s.input):
            s.role = "attn_out"
        elif _reaches_attention(s.node, linear_nodes):
            s.role = "attn_in"
    # q, k and v share their input: one found attention input makes its siblings ones too
    attn_inputs = {s.input for s in sites if s.role == "attn_in"}
    for s in sites:
        if s.role == "other" and s.input in attn_inputs:
            s.role = "attn_in"
    return sites


def site_table(sites: list[Site]) -> str:
    """A plain-text table of sites: module, role, shapes, rule applied."""
    tp = any(s.shard is not None for s in sites)
    rows = [("module", "role", "kind", "in", "out") + (("tp",) if tp else ()) + ("rule",)]
    for s in sites:
        shard = () if not tp else (f"{'col' if s.shard.dim == 0 else 'row'} {s.shard.index}/{s.shard.degree}"
                                   if s.shard else "-",)
        rows.append((s.module, s.role + (f" ({s.act})" if s.act else ""), s.kind,
                     str(s.in_features), str(s.out_features)) + shard + (s.rule,))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
