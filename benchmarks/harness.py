"""What every benchmark shares: timing on the GPU as a decode step runs, references, result files.

GPU timing: a decode step runs its layers back to back inside one CUDA graph, so kernels are
timed the same way: a graph of many calls that rotate over several input sets and over weight
copies that do not fit in L2, replayed and timed with events (median). Result files are JSON
with the GPU, the exact command and a list of rows, so any two runs compare by script.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

N_SETS = 4  # input sets a timed graph rotates over
L2_AVOID_BYTES = 240e6  # weight bytes between two uses of the same copy (the H200's L2 is 60 MB)
ERR_OK = 1e-2  # bf16: a relative error above this is a wrong result, not rounding


# ----------------------------------------------------------------------------------- logging, files

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_json(path: Path | str, data: Any) -> None:
    """Write JSON atomically (a run stopped half-way leaves the last complete file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command that made a result, as someone would type it again."""
    args = sys.argv[1:] if argv is None else argv
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in args)


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent is fine
            pass
    return out


def cudagraph_skips() -> int:
    """Graphs Inductor has so far compiled without CUDA graphs (a row whose step is not replayed
    from a graph pays for every launch from Python)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def result(command: str, rows: list[dict], **meta: Any) -> dict:
    """A GPU result file's shape: ``{"gpu", "command", "rows", ...}``."""
    return {"gpu": gpu_name(), "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
            "versions": versions(), **meta, "rows": rows}


# ----------------------------------------------------------------------------------- references

def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def threshold_for(sparsity: float) -> float:
    """|N(0,1)| quantile: a fraction ``sparsity`` of standard normal entries fall at or below it."""
    return float(math.sqrt(2.0) * torch.erfinv(torch.tensor(sparsity, dtype=torch.float64))) if sparsity > 0 else 0.0


def masked_ref(x: torch.Tensor, t, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` where ``|x| > t * row_scale[m]`` (t a float or per-channel tensor), else 0: the
    masked input a kernel's result is checked against."""
    cutoff = t.reshape(1, -1).float() if isinstance(t, torch.Tensor) else float(t)
    if row_scale is not None:
        cutoff = row_scale.reshape(-1, 1).float() * cutoff
    return torch.where(x.abs().float() > cutoff, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------------- GPU timing

def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of many)."""
    import triton.testing

    n = nbytes // 2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median")
    del a, b
    return 2 * n * 2 / (ms * 1e-3)


def graph_calls(fns):
    """One CUDA graph that runs every fn once, in order (after a warm-up on a side stream,
    which also autotunes); returns (graph, the outputs of the captured calls)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn() for fn in fns]
    return g, outs


def graph_of(fn):
    """Capture one fn() in a CUDA graph; returns (graph, its output)."""
    g, outs = graph_calls([fn])
    return g, outs[0]


def bench_graphs(graphs, warmup: int = 10, rep: int = 40) -> float:
    """Median microseconds of one replay, rotating over the graphs (different inputs)."""
    import triton.testing

    cyc = itertools.cycle(graphs)
    return 1e3 * triton.testing.do_bench(lambda: next(cyc).replay(), warmup=warmup, rep=rep, return_mode="median")


def bench_calls(fns, warmup: int = 10, rep: int = 60) -> float:
    """Median microseconds per call of a graph that runs ``fns`` back to back.

    This is how a decode step runs the layers: many kernels in one graph, one after another.
    Replaying a single-kernel graph instead adds a fixed graph-launch latency to every layer,
    which hides most of the gain on small layers.
    """
    import triton.testing

    g, _ = graph_calls(fns)
    ms = triton.testing.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median")
    return 1e3 * ms / len(fns)


def weight_copies(nbytes: int) -> int:
    """Copies of a weight to rotate over so that no call finds the last one's weights in L2."""
    return max(1, math.ceil(L2_AVOID_BYTES / nbytes))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
