"""Roofline cost model for input-sparse linear layers at decode time.

Decoding a few tokens is memory bound: time is bytes of weights over bandwidth, plus fixed
per-launch costs. Skipping the weight rows of input channels that no batch row needs saves
bytes in proportion to the *union* density of the batch. With M rows that are each active on a
fraction (1 - s) of channels, independently, a channel is needed with probability

    d(M, s) = 1 - s**M

so the sparse path stops paying as the batch grows: at s = 0.5, two rows already need 75% of
the weights. Real activations are correlated across tokens (the same large channels), so this
is the pessimistic case; the benchmark reports the measured union next to it.

The expressions are sympy: bytes, FLOPs and time as functions of M, K, N, s and the dtype
size, so the breakeven batch has a closed form (`breakeven_batch_expr`). Numbers come from
lambdified versions. The machine constants (`Device`) are least-squares fits of
time = bytes / (eta * BW) + T to the committed kernel benchmark of one GPU, whose times are per
call inside a graph of back-to-back calls of a layer, as in a decode step.

Three ways to run a masked linear are modelled: dense cuBLAS on the usual row-major weight (the
unmodified model), the sparse kernel, and the masked dense form that the rewrite emits where the
sparse kernel does not pay (``actsparse.ops.dense``): the mask fused by Inductor into the kernel
that produces the input, then cuBLAS on the input-major storage the sparse kernel needs (no extra
launch). The decision itself is ``actsparse.ops.dispatch.sparse_pays``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy as sp

M, K, N, s, b = sp.symbols("M K N s b", positive=True)
BW, PEAK, T_LAUNCH, T_SPARSE, E_DENSE, E_SPARSE, T_FALLBACK, E_FALLBACK, E_BATCH, T_BATCH = sp.symbols(
    "BW PEAK T_launch T_sparse eta_dense eta_sparse T_fallback eta_fallback eta_batch T_batch", positive=True)

#: Probability that at least one of M independent rows needs a given input channel.
union_density = 1 - s**M

#: Bytes through device memory (weights, input, output), dense and sparse.
dense_bytes = K * N * b + M * K * b + M * N * b
#: The sparse kernel also reads x once per program (cached) and adds fp32 partial sums in L2;
#: the DRAM bytes are the union's weight rows, the input and the output.
sparse_bytes = union_density * K * N * b + M * K * b + M * N * b

dense_flops = 2 * M * K * N
sparse_flops = 2 * M * K * N * union_density

#: Predicted seconds: the larger of the memory and compute times, plus fixed costs. The
#: efficiencies say what fraction of copy bandwidth each kernel reaches on a full layer.
dense_time = sp.Max(dense_bytes / (E_DENSE * BW), dense_flops / PEAK) + T_LAUNCH
#: One row runs the FMA kernel; 2..16 rows the tensor-core kernel (rows padded to 16), which
#: streams weights less efficiently: its own efficiency and fixed cost.
sparse_efficiency = sp.Piecewise((E_SPARSE, M <= 1), (E_BATCH, True))
sparse_overhead = sp.Piecewise((T_SPARSE, M <= 1), (T_BATCH, True))
sparse_time = sp.Max(sparse_bytes / (sparse_efficiency * BW), sparse_flops / PEAK) + T_LAUNCH + sparse_overhead
fallback_time = sp.Max(dense_bytes / (E_FALLBACK * BW), dense_flops / PEAK) + T_LAUNCH + T_FALLBACK


@dataclass(frozen=True)
class Device:
    """Machine constants for the model. Defaults: an H100 SXM, fitted to its kernel benchmark."""

    bandwidth: float = 2.96e12  # bytes/s, device copy (read + write)
    peak: float = 7.9e14  # FLOP/s, bf16 dense matmul
    # Efficiencies are fractions of the copy bandwidth (read + write counted), so a kernel that
    # only reads can exceed 1.
    dense_efficiency: float = 1.054  # cuBLAS GEMV on a full layer
    sparse_efficiency: float = 1.022  # sparse kernel, one row, on the weight rows it reads
    fallback_efficiency: float = 1.04  # cuBLAS on input-major storage (gpu_probe_h100.json)
    launch_overhead: float = 6.06e-6  # s, fixed cost of one layer call in a graph (see module doc)
    sparse_overhead: float = 0.43e-6  # s, extra: compaction and split-K reduction latency
    fallback_overhead: float = 0.0  # s, extra: none, the mask is fused into the input's producer
    batch_sparse_efficiency: float = 0.796  # sparse kernel, 2..16 rows (tensor-core path)
    batch_sparse_overhead: float = 0.71e-6  # s, extra, 2..16 rows

    def subs(self) -> dict:
        return {BW: self.bandwidth, PEAK: self.peak, E_DENSE: self.dense_efficiency,
                E_SPARSE: self.sparse_efficiency, T_LAUNCH: self.launch_overhead,
                T_SPARSE: self.sparse_overhead, E_FALLBACK: self.fallback_efficiency,
                T_FALLBACK: self.fallback_overhead, E_BATCH: self.batch_sparse_efficiency,
                T_BATCH: self.batch_sparse_overhead}


H100 = Device()

_ARGS = (M, K, N, s, b, BW, PEAK, E_DENSE, E_SPARSE, T_LAUNCH, T_SPARSE, E_FALLBACK, T_FALLBACK, E_BATCH, T_BATCH)


@functools.lru_cache(maxsize=None)
def _fn(name: str):
    expr = {"dense_time": dense_time, "sparse_time": sparse_time, "fallback_time": fallback_time,
            "dense_bytes": dense_bytes,
            "sparse_bytes": sparse_bytes, "union": union_density, "dense_flops": dense_flops,
            "sparse_flops": sparse_flops}[name]
    return sp.lambdify(_ARGS, expr, modules="math")


def _kw(device: Device | None, bandwidth, peak):
    d = device or H100
    return (bandwidth if bandwidth is not None else d.bandwidth, peak if peak is not None else d.peak,
            d.dense_efficiency, d.sparse_efficiency, d.launch_overhead, d.sparse_overhead,
            d.fallback_efficiency, d.fallback_overhead, d.batch_sparse_efficiency, d.batch_sparse_overhead)


def _eval(name, m, k, n, sparsity, dtype_bytes, device=None, bandwidth=None, peak=None) -> float:
    return float(_fn(name)(m, k, n, min(max(sparsity, 0.0), 1.0), dtype_bytes, *_kw(device, bandwidth, peak)))


def union(m: int, sparsity: float) -> float:
    """Union density 1 - s^M of M independent rows."""
    return 1.0 - min(max(sparsity, 0.0), 1.0) ** m


def bytes_moved(m, k, n, sparsity, dtype_bytes, sparse=True) -> float:
    return _eval("sparse_bytes" if sparse else "dense_bytes", m, k, n, sparsity, dtype_bytes)


def flops(m, k, n, sparsity, sparse=True) -> float:
    return _eval("sparse_flops" if sparse else "dense_flops", m, k, n, sparsity, 2)


def predict(m, k, n, sparsity, dtype_bytes=2, device: Device | None = None, bandwidth=None, peak=None) -> dict:
    """Predicted seconds (dense cuBLAS, sparse kernel, dense fallback) for one linear layer;
    `speedup` is dense / sparse."""
    td = _eval("dense_time", m, k, n, sparsity, dtype_bytes, device, bandwidth, peak)
    ts = _eval("sparse_time", m, k, n, sparsity, dtype_bytes, device, bandwidth, peak)
    tf = _eval("fallback_time", m, k, n, sparsity, dtype_bytes, device, bandwidth, peak)
    return {"dense_s": td, "sparse_s": ts, "fallback_s": tf, "speedup": td / ts, "union": union(m, sparsity)}


def prefer_sparse(m, k, n, sparsity, dtype_bytes=2, bandwidth=None, peak=None, device: Device | None = None,
                  against: str = "dense") -> bool:
    """Whether the sparse kernel is predicted faster than the alternative: "dense" (cuBLAS on
    the row-major weight, the unmodified model) or "fallback" (mask + `F.linear` on the same
    input-major storage: what the wrapper would run instead)."""
    p = predict(m, k, n, sparsity, dtype_bytes, device, bandwidth, peak)
    return p["sparse_s"] < (p["dense_s"] if against == "dense" else p["fallback_s"])


def breakeven_density_expr():
    """Union density d* at which the batch (2..16 rows) sparse kernel and dense take equal time
    (memory-bound regime)."""
    d = sp.Symbol("d", positive=True)
    t_s = (d * K * N * b + M * K * b + M * N * b) / (E_BATCH * BW) + T_LAUNCH + T_BATCH
    t_d = dense_bytes / (E_DENSE * BW) + T_LAUNCH
    (sol,) = sp.solve(sp.Eq(t_s, t_d), d)
    return sp.simplify(sol)


def breakeven_batch_expr():
    """M* with 1 - s^M* = d*, i.e. M* = log(1 - d*) / log(s) (d* taken at M = 1)."""
    d_star = breakeven_density_expr().subs(M, 1)
    return sp.log(1 - d_star) / sp.log(s)


def breakeven_batch(k, n, sparsity, dtype_bytes=2, bandwidth=None, peak=None, device: Device | None = None,
                    max_batch: int = 4096) -> float:
    """The smallest batch at which the sparse path stops paying (dense is predicted as fast).

    1 means sparse never pays for this layer; math.inf means it still pays at `max_batch`.
    Found by scanning the full model (compute roofline included); `breakeven_batch_expr`
    gives the memory-bound closed form.
    """
    if sparsity <= 0.0:
        return 1
    for m in range(1, max_batch + 1):
        if not prefer_sparse(m, k, n, sparsity, dtype_bytes, bandwidth, peak, device):
            return m
    return math.inf


def gated_mlp_predict(m, d_model, d_ff, sparsity, dtype_bytes=2, device: Device | None = None) -> dict:
    """CATS gated MLP: gate dense, up and down on the union of active neurons."""
    d = device or H100
    gate = predict(m, d_model, d_ff, 0.0, dtype_bytes, d)
    up = predict(m, d_model, d_ff, sparsity, dtype_bytes, d)
    down = predict(m, d_ff, d_model, sparsity, dtype_bytes, d)
    dense = 3 * gate["dense_s"]
    # the fused gate+up kernel is one launch; down is a second
    sparse = gate["dense_s"] + up["sparse_s"] - d.launch_overhead + down["sparse_s"]
    return {"dense_s": dense, "sparse_s": sparse, "speedup": dense / sparse, "union": union(m, sparsity)}


# ------------------------------------------------------------------------------ decode attention

#: Fixed cost of the head-sparse attention kernel over the dense attention it replaces: a second
#: launch (the split combine) and the unit-index read.
HEAD_KERNEL_OVERHEAD_S = 4e-6


def kv_bytes(batch: int, kv_heads: int, length: int, head_dim: int, dtype_bytes: int) -> float:
    """Bytes of K and V one decode step reads for every sequence's whole cache."""
    return 2.0 * batch * kv_heads * length * head_dim * dtype_bytes


def head_sparse_attention_pays(batch: int, kv_heads: int, length: int, head_dim: int, density: float,
                               dtype_bytes: int = 2, device: Device | None = None) -> bool:
    """Whether reading only the selected units' K/V saves more than the kernel's fixed cost.

    Decode attention is memory bound: its time is the K/V bytes over bandwidth, so the kernel
    saves (1 - density) of them. At batch 1 and short contexts that is a fraction of a
    microsecond per layer, less than the cost of a second launch.
    """
    bw = (device or H100).bandwidth  # a pure read streams about as fast as the copy rate counts bytes
    saved = (1.0 - density) * kv_bytes(batch, kv_heads, length, head_dim, dtype_bytes) / bw
    return saved > HEAD_KERNEL_OVERHEAD_S
