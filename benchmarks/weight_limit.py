"""The weight-bandwidth limit of a decode step: how fast it could go if it only read weights.

Decoding a few tokens is memory bound, so the ceiling for a variant is the weight bytes one step
actually reads over the rate the GPU reads memory (its measured GEMV bandwidth). A masked
linear reads only the weight rows of the input channels some row of the batch needs: a
fraction ``1 - s**B`` of them for B rows that are each sparse at ``s`` independently (the
cost model's union), and all of them where the backend runs that layer dense (the cost model's
choice at that batch). Everything else (the LM head, norms) is read in full. KV-cache reads and
the time between kernels are left out on purpose: the gap between a measured rate and this
limit is exactly that time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.decode import weight_bytes


def site_sparsity(plan) -> dict[str, float]:
    """Module name -> sparsity of its input for the plan's TEAL thresholds: the calibrated
    (measured) value where the plan has one, else its target."""
    if plan is None:
        return {}
    out = {}
    for name in plan.thresholds:
        s = plan.measured.get(name, plan.target)
        if s is not None:
            out[name] = min(max(float(s), 0.0), 1.0)
    return out


def _cuda_pays(rows: int, k: int, n: int, sparsity: float, nbytes: int) -> bool:
    from actsparse.ops.dispatch import sparse_pays

    return sparse_pays("cuda", rows, k, [n], sparsity, nbytes)


def bytes_per_step(model, plan=None, batch: int = 1,
                   pays: Callable[[int, int, int, float, int], bool] = _cuda_pays) -> float:
    """Weight bytes one decode step of ``batch`` rows reads under ``plan`` (None: dense).

    ``pays(rows, k, n, sparsity, element_bytes)`` says whether the sparse kernel runs for a
    layer (default: the backend's own CUDA decision); where it does not, the layer reads all.
    """
    total = float(weight_bytes(model))
    for name, s in site_sparsity(plan).items():
        w = model.get_submodule(name).weight
        n, k = w.shape
        if not pays(batch, k, n, s, w.element_size()):
            continue
        density = 1.0 - s ** batch
        total -= (1.0 - density) * w.numel() * w.element_size()
    return total


def limit_tok_s(bytes_step: float, bandwidth: float, batch: int = 1) -> float:
    """Tokens/s if a step took only its weight reads at ``bandwidth`` bytes/s (``batch`` tokens
    per step)."""
    return batch * bandwidth / bytes_step


def gemv_bandwidth(k: int = 4096, n: int = 14336, dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes/s cuBLAS reads at batch 1 (an 8B-sized dense GEMV, weight copies that miss L2, in a
    CUDA graph of back-to-back calls): the rate a decode step's weight reads can reach."""
    import torch.nn.functional as F

    from benchmarks.harness import bench_calls, weight_copies

    nbytes = k * n * torch.finfo(dtype).bits // 8
    nc = weight_copies(nbytes)
    ws = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(nc)]
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    us = bench_calls([lambda i=i: F.linear(x, ws[i % nc]) for i in range(max(24, nc))])
    del ws
    torch.cuda.empty_cache()
    return nbytes / (us * 1e-6)
