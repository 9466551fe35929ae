"""``actsparse::sparse_gated_product``: a gated MLP's down input, ``act(gate x_g) * up x_u``,
where gate and up read the same x through their own input masks (TEAL thresholds or statistical
top-k, as ``sparse_linear``). Input-sparse weights: ``weights`` (gate, up; stored input-major).

One call instead of ``sparse_linear`` followed by the product: on the GPU the predicated kernel's
finishing launch writes the product directly, so the layer runs one launch fewer and gate and up
are never written out. Elsewhere it is ``sparse_linear``'s own dispatch, then the product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import choose
from .reference import activation, gated_product_reference, row_scale
from .sparse_linear import reserve_sparse_gemv, run_on_path
from .spec import define_op


def _sparse_gated_product(x: Tensor, weights: list[Tensor], thresholds: list[float], act: str, per_token: bool,
                          sparsity_hint: float) -> Tensor:
    """``act(linear(x * (|x| > t_0), W_gate)) * linear(x * (|x| > t_1), W_up)``."""
    if len(weights) != 2 or len(thresholds) != 2:
        raise ValueError(f"sparse_gated_product takes gate and up: 2 weights and 2 thresholds, got "
                         f"{len(weights)} and {len(thresholds)}")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = int(weights[0].shape[0])
    chosen = choose(x2, k, [n, n], sparsity_hint, weights[0].element_size())
    path, tri = chosen
    if path == "triton":
        h = tri.launch_sparse_linear(x2.contiguous(), list(weights), [None, None], [float(t) for t in thresholds],
                                     row_scale(x2) if per_token else None, sparsity_hint, epilogue=act)[0]
    else:
        g, u = run_on_path(chosen, x2, list(weights), [None, None], list(thresholds), per_token, sparsity_hint)
        h = activation(act, g) * u
    return h.reshape(*lead, n)


def _fake(x, weights, thresholds, act, per_token, sparsity_hint):
    return x.new_empty(*x.shape[:-1], weights[0].shape[0])


def _reference(x, weights, thresholds, act, per_token, sparsity_hint):
    return gated_product_reference(x, weights, thresholds, act, per_token)


def _reserve(args) -> None:
    ws = args["weights"]
    if ws and all(isinstance(w, torch.Tensor) for w in ws):
        reserve_sparse_gemv(ws[0].device, ws[0].shape[1], [w.shape[0] for w in ws])


SPEC = define_op("sparse_gated_product", _sparse_gated_product, _fake, reference=_reference,
                 input_sparse=("weights",), reserve=_reserve)
sparse_gated_product = SPEC.op
