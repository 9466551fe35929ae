"""``actsparse::cached_sparse_linear``: thresholded input-sparse linear over a cached weight index.

An alternative CPU decode path: the dispatch never picks it (the native kernel reads only the
active rows and writes nothing). Measured on the CPU it loses to the native kernel at every
overlap tried, 0.9 included, and on relufied SmolLM2 consecutive tokens share only 63% (ReLU)
or 54% (shifted ReLU) of their active neurons (benchmarks/results/index_step_relufied_cpu.json);
it stays an op for machines or models where that changes. One :class:`WeightRowCache` per site lives in a Python-side
registry keyed by ``site_id``; the op is opaque to torch.compile (a ``torch.library`` op with a
fake implementation), so it is never traced into and mutating the registry inside it is safe.
Because the op is declared functional, Inductor may drop a call whose result is unused; that
only skips one cache step, and the next step still returns the exact rows for its mask.

Per call, with x ``[..., K]`` flattened to ``[M, K]`` and keep = ``|x| > threshold``:

* ``M > CACHE_MAX_ROWS`` (prefill): reset the site's cache, compute densely
  ``F.linear(x * keep, weight, bias)``; gathering a union over many tokens approaches dense.
* otherwise: step the cache with the union of keep over the M rows, zero each row's unkept x
  values (exact per sequence), and multiply over the compact buffer prefix.

Memory per site: the prepared input-major copy ``weight.t().contiguous()`` (K*N*itemsize, the
same as the weight) plus the cache buffer (capacity*N*itemsize, capacity = CAPACITY_FRACTION*K)
plus a staging buffer of max(64, capacity/8) rows: about 2.1x the weight at the defaults; see
:func:`registry_nbytes`. The copy is kept because row gathers from the strided ``weight.t()``
view are 2-15x slower on CPU (12x at Llama-3.2-3B down_proj; benchmarks/index_step.py measures both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.weight_cache import WeightRowCache
from .limits import CACHE_MAX_ROWS
from .reference import cached_sparse_linear_reference
from .spec import define_op

__all__ = [
    "PREPARE_INPUT_MAJOR",
    "CAPACITY_FRACTION",
    "cached_sparse_linear",
    "reset",
    "reset_all",
    "release_all",
    "registry_nbytes",
    "get_cache",
]

# Cache capacity as a fraction of the input channels K. 1.0 never overflows; a smaller value
# bounds memory (e.g. 0.6 at a 50% plan) and a step with more active channels than that runs
# as an uncached gather (still exact).
CAPACITY_FRACTION = 1.0

# Keep one contiguous input-major copy of each site's weight (see module docstring).
PREPARE_INPUT_MAJOR = True

_REGISTRY: dict[int, tuple[tuple, WeightRowCache]] = {}


def _weight_key(weight: Tensor) -> tuple:
    """Identity of the weight a cache was built from; a change (new tensor, in-place update)
    rebuilds the cache so it never serves stale rows."""
    try:
        version = weight._version
    except RuntimeError:  # inference tensors carry no version counter
        version = None
    return (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device, version)


def get_cache(site_id: int, weight: Tensor) -> WeightRowCache:
    """The site's cache, created (or rebuilt when the weight changed) from ``weight [N, K]``."""
    key = _weight_key(weight)
    entry = _REGISTRY.get(site_id)
    if entry is None or entry[0] != key:
        K = weight.shape[1]
        capacity = min(K, math.ceil(CAPACITY_FRACTION * K))
        cache = WeightRowCache.from_weight(weight, capacity, input_major=PREPARE_INPUT_MAJOR)
        _REGISTRY[site_id] = (key, cache)
        return cache
    return entry[1]


def reset(site_id: int) -> None:
    """Forget the cached rows of one site (keeps its buffers)."""
    entry = _REGISTRY.get(site_id)
    if entry is not None:
        entry[1].reset()


def reset_all() -> None:
    """Forget the cached rows of every site, e.g. between independent generations."""
    for _, cache in _REGISTRY.values():
        cache.reset()


def release_all() -> None:
    """Drop every site's cache and prepared weight copy (frees the memory)."""
    _REGISTRY.clear()


def registry_nbytes() -> dict[str, int]:
    """Memory held by the registry: cache buffers and prepared weight copies, in bytes."""
    cache = sum(c.nbytes for _, c in _REGISTRY.values())
    source = sum(c.source_nbytes for _, c in _REGISTRY.values())
    return {"sites": len(_REGISTRY), "cache": cache, "prepared_weights": source, "total": cache + source}


# The op is declared with the low-level ``torch.library.Library`` API rather than
# ``torch.library.custom_op``: same schema, fake and torch.compile behaviour, but the dispatch
# into the Python kernel is several times cheaper on the CPU, and a decoder calls it once per
# linear per token. CompositeExplicitAutograd: any device works functionally (the fast path is
# meant for the CPU); the autograd formula comes from the reference.
SCHEMA = "cached_sparse_linear(Tensor x, Tensor weight, Tensor? bias, float threshold, int site_id) -> Tensor"
_LIB = torch.library.Library("actsparse", "FRAGMENT")


def _cached_sparse_linear_impl(
    x: Tensor, weight: Tensor, bias: Tensor | None, threshold: float, site_id: int
) -> Tensor:
    """``F.linear(x * (|x| > threshold), weight, bias)`` via the site's cached weight index."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    keep = x2.abs() > threshold
    if M > CACHE_MAX_ROWS:
        reset(site_id)
        return F.linear(x2 * keep, weight, bias).reshape(*x.shape[:-1], N)
    if M == 0:
        return x.new_zeros(*x.shape[:-1], N)
    cache = get_cache(site_id, weight)
    if M > 1:
        union = keep.any(0)
        x2 = x2 * keep  # zero what each sequence does not select: exact per sequence
    else:
        union = keep.view(-1)  # a single row selects exactly its own channels
    buf, idx = cache.step(union)
    xg = x2.index_select(1, idx)
    y = torch.mm(xg, buf) if bias is None else torch.addmm(bias, xg, buf)
    return y.view(*x.shape[:-1], N)


def _fake(x, weight, bias, threshold, site_id):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _reference(x, weight, bias, threshold, site_id):
    return cached_sparse_linear_reference(x, weight, bias, threshold)


SPEC = define_op("cached_sparse_linear", _cached_sparse_linear_impl, _fake, reference=_reference,
                 schema=SCHEMA, lib=_LIB)
#: ``actsparse::cached_sparse_linear``: ``(x, weight, bias, threshold, site_id) -> Tensor``.
cached_sparse_linear = SPEC.op
