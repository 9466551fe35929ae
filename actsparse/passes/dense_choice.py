"""Compile-time choice between the sparse ops and a plain masked matmul, per site and batch.

A Dynamo graph is traced for one input shape (static shapes are the default, and a decode step
under CUDA graphs always has them), so the number of token rows a site multiplies is known when
the pass runs. Where the sparse path cannot pay for those rows (prefill; a decode batch whose
rows' masks together cover nearly every input channel), the rewrite emits the mask and the
linear as ordinary torch ops instead of an actsparse op. Inductor then fuses the mask into the
kernel that produces the input (the RMSNorm, the ``act(gate) * up`` product) and runs the
matmul as it would for the dense model: no masking launches, no dense fallback inside an op.

The decision uses the cost model (``actsparse.kernels.cost_model``) on CUDA devices and the CPU
op's own row limit on the CPU. With symbolic (dynamic) row counts the op stays and chooses at
run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..kernels.reference import activation, input_mask


def example_value(node: fx.Node):
    """The fake tensor Dynamo recorded for a node, if any."""
    return node.meta.get("val", node.meta.get("example_value"))


def static_rows(x: fx.Node) -> int | None:
    """Token rows of a linear input (all dims but the last), or None if unknown or symbolic."""
    v = example_value(x)
    if not isinstance(v, torch.Tensor) or v.dim() < 1:
        return None
    dims = v.shape[:-1]
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


def _device_and_bytes(x: fx.Node) -> tuple[str, int] | None:
    v = example_value(x)
    if not isinstance(v, torch.Tensor):
        return None
    return v.device.type, v.element_size()


def dense_is_better(device: str, rows: int, k: int, ns: Sequence[int], sparsity: float, nbytes: int,
                    gated: bool = False) -> bool:
    """The decision itself: ``rows`` token rows on a ``device`` ("cpu", "cuda"), input width
    ``k``, outputs ``ns`` (gated: ``ns = [d_ff]`` of a CATS MLP), calibrated ``sparsity``."""
    from ..kernels import cost_model
    from ..kernels.ops import GATHER_MAX_ROWS, TRITON_MAX_ROWS

    if device == "cpu":
        return rows > GATHER_MAX_ROWS
    if device != "cuda":
        return False
    if rows > TRITON_MAX_ROWS:
        return True
    if gated:
        return cost_model.gated_mlp_predict(rows, k, int(ns[0]), float(sparsity), nbytes)["speedup"] <= 1.0
    return not cost_model.prefer_sparse(rows, k, int(sum(ns)), float(sparsity), nbytes, against="fallback")


def run_dense(x: fx.Node, k: int, ns: Sequence[int], sparsity: float, gated: bool = False) -> bool:
    """Whether the masked linears on input ``x`` should run as a plain masked matmul for the
    rows this graph was traced with (False where they are unknown or symbolic)."""
    rows = static_rows(x)
    info = _device_and_bytes(x)
    if rows is None or info is None or rows == 0:
        return False
    return dense_is_better(info[0], rows, k, ns, sparsity, info[1], gated)


# The functions the rewrite inserts (as call_function targets: AOTAutograd traces them into
# aten ops, which Inductor fuses with their neighbours). Same semantics as the ops' reference.

def masked_input(x: torch.Tensor, threshold: float, per_token: bool) -> torch.Tensor:
    """``x`` where ``|x| > t`` (per_token: ``t * mean|row|``), compared in fp32; else 0."""
    return torch.where(input_mask(x, threshold, per_token), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                     b_gate, b_up, b_down, act: str, threshold: float) -> torch.Tensor:
    """CATS: ``down(where(|act(gate x)| > t, act(gate x) * up x, 0))``, all dense."""
    g = activation(act, F.linear(x, w_gate, b_gate))
    h = torch.where(input_mask(g, threshold, False), g * F.linear(x, w_up, b_up),
                    torch.zeros((), dtype=g.dtype, device=g.device))
    return F.linear(h, w_down, b_down)
