"""Row limits of the dispatch policy, in one place.

"Rows" are the token rows a linear multiplies in one call (batch x new tokens): 1 per
sequence while decoding, the whole prompt during prefill.
"""

from ..kernels.limits import TRITON_MAX_ROWS

#: Token rows up to which a CPU op skips inactive weight rows (native kernel or gather);
#: above it (prefill) the union of the rows' masks is nearly dense and one GEMM is cheaper.
CPU_SPARSE_MAX_ROWS = 4

#: Fraction of active input channels (union over the rows) above which the CPU gather path runs
#: dense instead: gathering nearly every row copies as many bytes as the dense matmul reads.
CPU_GATHER_MAX_DENSITY = 0.85

#: Token rows up to which CUDA tensors may go to the Triton sparse kernels (their capability).
GPU_SPARSE_MAX_ROWS = TRITON_MAX_ROWS

#: Token rows up to which the cached-weight index op steps its cache; above it (prefill) it
#: resets the cache and runs dense.
CACHE_MAX_ROWS = 16

__all__ = ["CACHE_MAX_ROWS", "CPU_GATHER_MAX_DENSITY", "CPU_SPARSE_MAX_ROWS", "GPU_SPARSE_MAX_ROWS"]
