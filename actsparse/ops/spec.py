"""How an actsparse op is declared: schema and fake, autograd from its reference, and what the
other layers may ask of it by argument name.

``define_op`` registers a ``torch.library`` custom op and an ``OpSpec`` that says which
arguments are weights the op reads input-sparse (the compiler stores those input-major) and
how to size its kernels' workspaces at compile time. Passes and the backend go through the
spec (``input_sparse_weights(node)``, ``reserve(node)``), never through argument positions.

Every op gets an autograd formula: the backward recomputes the op's pure-torch reference with
the masks held fixed and differentiates it, so grad-mode forward and backward work and match
the reference's gradients (a mask is a step function: its derivative is zero almost everywhere).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor


@dataclass(frozen=True)
class OpSpec:
    """What the compiler may ask of an op."""

    name: str
    op: Any  # torch._ops.OpOverload
    #: Arguments holding weights the op reads by input channel: stored input-major.
    input_sparse: tuple[str, ...] = ()
    #: Sizes the op's kernel workspaces from its arguments' example values, ahead of CUDA graphs.
    reserve: Callable[[dict[str, Any]], None] | None = None


OPS: dict[Any, OpSpec] = {}


def _arg_names(op) -> list[str]:
    """The op's argument names, from its schema."""
    return [a.name for a in op._schema.arguments]


def bound_args(node: fx.Node) -> dict[str, Any]:
    """A call_function node's arguments by the op's schema names."""
    names = _arg_names(node.target)
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def spec_of(node: fx.Node) -> OpSpec | None:
    return OPS.get(node.target) if node.op == "call_function" else None


def input_sparse_weights(node: fx.Node) -> list[fx.Node]:
    """The graph nodes of the weights ``node`` (an actsparse op call) reads input-sparse."""
    spec = spec_of(node)
    if spec is None:
        return []
    args = bound_args(node)
    out: list[fx.Node] = []
    for name in spec.input_sparse:
        v = args.get(name)
        for w in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(w, fx.Node):
                out.append(w)
    return out


def _example(v: Any) -> Any:
    if isinstance(v, fx.Node):
        if v.op == "call_method" and v.target == "t":  # a transposed weight view (Conv1D)
            inner = _example(v.args[0])
            return None if inner is None else inner.t()
        return v.meta.get("example_value", v.meta.get("val"))
    if isinstance(v, (list, tuple)):
        return [_example(a) for a in v]
    return v


def reserve(node: fx.Node) -> None:
    """Let the op size its kernels' workspaces from the node's example values."""
    spec = spec_of(node)
    if spec is not None and spec.reserve is not None:
        spec.reserve({k: _example(v) for k, v in bound_args(node).items()})


# ---------------------------------------------------------------------------------- autograd

def _leaf(v: Any) -> Any:
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.detach().requires_grad_(True)
    if isinstance(v, (list, tuple)):
        return [_leaf(a) for a in v]
    return v


def _flat(v: Any) -> list[Tensor]:
    if isinstance(v, Tensor):
        return [v] if v.requires_grad else []
    if isinstance(v, (list, tuple)):
        return [t for a in v for t in _flat(a)]
    return []


def _unflat(v: Any, grads: dict[int, Tensor | None]) -> Any:
    """The gradient of one argument, in the structure torch.library expects back: a list of
    gradients for a list of tensors, else a single value (None for non-tensors, including a
    list of floats, which torch.library treats as one non-differentiable leaf)."""
    if isinstance(v, Tensor):
        return grads.get(id(v)) if v.requires_grad else None
    if isinstance(v, list) and all(isinstance(a, Tensor) for a in v):
        return [_unflat(a, grads) for a in v]
    return None


class _Saved:
    """Where a saved tensor goes back in the op's (possibly nested) arguments."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


def autograd_from_reference(qualname: str, reference: Callable[..., Any], lib=None) -> None:
    """Register the backward of op ``qualname`` as the gradient of ``reference`` (same arguments)."""

    def setup_context(ctx, inputs, output):
        for v in inputs:
            # torch.library passes a list mixing tensors and None (Tensor?[] biases, some None)
            # as one opaque value: its tensors would silently get no gradient
            if isinstance(v, list) and any(a is None for a in v) and \
                    any(isinstance(a, Tensor) and a.requires_grad for a in v):
                raise RuntimeError(
                    f"actsparse::{qualname.split('::')[-1]}: a list argument mixes None and tensors that "
                    "require grad; torch.library cannot return their gradients (pass zero tensors for "
                    "the None entries, or detach them)")
        tensors: list[Tensor] = []

        def pack(v):
            if isinstance(v, Tensor):
                tensors.append(v)
                return _Saved(len(tensors) - 1)
            if isinstance(v, (list, tuple)):
                return [pack(a) for a in v]
            return v

        ctx.packed = [pack(v) for v in inputs]
        ctx.save_for_backward(*tensors)

    def backward(ctx, *grad_out):
        saved = ctx.saved_tensors

        def unpack(v):
            if isinstance(v, _Saved):
                return saved[v.i]
            if isinstance(v, list):
                return [unpack(a) for a in v]
            return v

        inputs = [_leaf(unpack(v)) for v in ctx.packed]
        with torch.enable_grad():
            out = reference(*inputs)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        grads = list(grad_out[0]) if len(grad_out) == 1 and isinstance(grad_out[0], (list, tuple)) else list(grad_out)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        leaves = _flat(inputs)
        got: dict[int, Tensor | None] = {}
        if pairs and leaves:
            gs = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
            got = {id(t): g for t, g in zip(leaves, gs)}
        return tuple(_unflat(v, got) for v in inputs)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=lib)


def define_op(name: str, impl: Callable, fake: Callable, *, reference: Callable | None = None,
              input_sparse: Sequence[str] = (), reserve: Callable[[dict[str, Any]], None] | None = None,
              schema: str | None = None, lib: torch.library.Library | None = None) -> OpSpec:
    """Register ``actsparse::<name>`` and its spec.

    ``impl``/``fake`` define the op as a ``torch.library.custom_op`` (schema inferred from the
    type hints), or, with ``schema`` and ``lib``, through the lower-level Library API (cheaper
    dispatch on the CPU). ``reference`` (same arguments) gives the autograd formula.
    """
    if schema is None:
        custom = torch.library.custom_op(f"actsparse::{name}", mutates_args=())(impl)
        custom.register_fake(fake)
    else:
        lib.define(schema)
        lib.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"actsparse::{name}", fake, lib=lib)
    op = getattr(torch.ops.actsparse, name).default
    if reference is not None:
        autograd_from_reference(f"actsparse::{name}", reference, lib=lib)
    spec = OpSpec(name=name, op=op, input_sparse=tuple(input_sparse), reserve=reserve)
    OPS[op] = spec
    return spec
