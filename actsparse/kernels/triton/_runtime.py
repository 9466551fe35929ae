"""Small runtime helpers shared by the Triton kernels.

Kept apart from the kernels so that each kernel file reads like a tutorial: what the GPU does,
not how buffers are cached or how autotuning is keyed.
"""

from __future__ import annotations

import functools
import inspect
import zlib

import torch

import triton

from ..limits import BATCH_BUCKETS, TRITON_MAX_ROWS as MAX_ROWS


from . import interpreting  # noqa: E402  (re-exported for the kernel modules)


def batch_bucket(m: int) -> int:
    for b in BATCH_BUCKETS:
        if m <= b:
            return b
    return MAX_ROWS


def sparsity_bucket(hint: float | None) -> int:
    """The calibrated sparsity rounded to 0.1, as an int 0..10 (-1: unknown)."""
    if hint is None:
        return -1
    return int(round(min(max(float(hint), 0.0), 1.0) * 10))


@functools.lru_cache(maxsize=None)
def _device_key_cached(index: int) -> int:
    return zlib.crc32(torch.cuda.get_device_name(index).encode()) & 0x7FFFFFFF


def device_key(device: torch.device) -> int:
    """An int naming the GPU model, part of every autotune key.

    Triton's on-disk autotune cache is keyed by architecture (sm_90), not by the card: an
    H100 and an H200 would share tuned configs. Putting the device name into the key keeps
    them apart.
    """
    if device.type != "cuda":
        return 0
    return _device_key_cached(device.index if device.index is not None else torch.cuda.current_device())


def autotune_bench(fn, quantiles=None):
    """Benchmark for autotuning: the kernel as the decode step runs it, inside a CUDA graph.

    `do_bench` times single launches, and for kernels of a few microseconds the host's launch
    overhead is part of every candidate's time, so configurations a microsecond apart would be
    ranked by noise. `graph_bench` replays the kernel from a CUDA graph with L2 flushed before
    each call; it falls back to `do_bench` where a graph cannot be captured.
    """
    if torch.cuda.is_available() and not interpreting() and not torch.cuda.is_current_stream_capturing():
        try:
            return graph_bench(fn, quantiles=quantiles)
        except Exception:  # noqa: BLE001 - any capture problem: time the plain way
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def graph_bench(fn, quantiles=None, calls: int = 8, reps: int = 15):
    """Milliseconds per call of `fn` replayed from a CUDA graph, L2 flushed before each call.

    Two graphs: `calls` x (flush, fn) and `calls` x (flush); each replay is timed with events
    and the per-call time is their difference. The flush (a 64 MiB memset) evicts the weights,
    as 30 other layers would between two calls of the same layer in a decode step.
    """
    # Allocated per call and freed on return: a cached buffer first allocated inside the memory
    # pool of a CUDA-graph tree's warm-up would outlive it, which the trees reject.
    flush = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(g)
    both, only_flush = graphs
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        t = []
        for g in graphs:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            t.append(start.elapsed_time(end))
        samples.append(max(t[0] - t[1], 1e-6) / calls)
    del both, only_flush, graphs, flush
    samples = torch.tensor(samples)
    if quantiles is not None:
        return [float(torch.quantile(samples, q)) for q in quantiles]
    return float(samples.median())


def autotune(configs, key, prune=None):
    """`triton.autotune` with our short benchmark and the cross-process result cache.

    No pre/post hooks (torch.compile rejects them); buffers that must start at zero are kept
    zero by the kernels themselves (see `zeroed_buffer`).
    """
    kwargs = dict(configs=configs, key=key, do_bench=autotune_bench, cache_results=True)
    if prune is not None:
        kwargs["prune_configs_by"] = {"early_config_prune": prune}
    accepted = inspect.signature(triton.autotune).parameters  # older tritons lack some options
    return triton.autotune(**{k: v for k, v in kwargs.items() if k in accepted})


# --------------------------------------------------------------------------------------------
# Persistent buffers.
#
# The split-K kernels accumulate fp32 partial sums in a workspace and count finished programs
# in an int32 counter per output block; the last program of a block writes the output and
# resets both to zero. So a buffer that starts at zero is zero again after every launch, and
# one allocation per device serves every call: no memset launch per call, nothing to zero in
# an autotune hook, nothing that breaks CUDA graph capture.
# --------------------------------------------------------------------------------------------

_BUFFERS: dict[tuple, torch.Tensor] = {}
# Buffers replaced by larger ones stay alive: a captured CUDA graph may still point at them.
_RETIRED: list[torch.Tensor] = []


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def zeroed_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of at least `numel` zeros that the kernels leave zeroed after each launch.

    Cached per device. While a CUDA graph is being captured we must not create the cached
    buffer (its zeroing memset would only run at replay time), so a call that needs a larger
    buffer during capture gets a fresh zeroed one whose memset becomes part of the graph.
    One stream at a time: two kernels running concurrently on different streams would share it.
    """
    key = (name, dtype, device.type, device.index)
    buf = _BUFFERS.get(key)
    if buf is not None and buf.numel() >= numel:
        return buf
    if _capturing(device):
        return torch.zeros(numel, dtype=dtype, device=device)
    size = 1 << max(int(numel) - 1, 1).bit_length()  # grow in powers of two
    if key in _BUFFERS:
        _RETIRED.append(_BUFFERS[key])
    buf = torch.zeros(size, dtype=dtype, device=device)
    _BUFFERS[key] = buf
    return buf


def scratch_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached buffer whose contents do not matter between launches (index lists)."""
    key = ("scratch", name, dtype, device.type, device.index)
    buf = _BUFFERS.get(key)
    if buf is not None and buf.numel() >= numel:
        return buf
    if _capturing(device):
        return torch.empty(numel, dtype=dtype, device=device)
    size = 1 << max(int(numel) - 1, 1).bit_length()
    if key in _BUFFERS:
        _RETIRED.append(_BUFFERS[key])
    buf = torch.empty(size, dtype=dtype, device=device)
    _BUFFERS[key] = buf
    return buf


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 weights are multiplied in full fp32 ("ieee"), never silently in tf32.

    "upcast": Triton's CPU interpreter computes bf16 `tl.dot` wrongly (checked with triton
    3.9), so under the interpreter bf16 tiles are upcast to fp32 before the dot.
    """
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tf32"
