"""The dense-or-sparse decision, made in one place for the passes (compile time) and the ops
(run time, where the row count was symbolic when the graph was compiled).

Decoding a few tokens is memory bound and the sparse kernels pay; prefill multiplies many rows
whose masks together cover nearly every channel, and a dense matmul on the masked input is
cheaper. On CUDA the cost model (``cost_model``) weighs the two for the rows, shapes and
calibrated sparsity; on the CPU the row limit decides.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from contextlib import contextmanager
from types import ModuleType

import torch

from . import cost_model
from .limits import CPU_SPARSE_MAX_ROWS, GPU_SPARSE_MAX_ROWS


def sparse_pays(device: str, rows: int, k: int, ns: Sequence[int], sparsity: float | None, nbytes: int,
                gated: bool = False) -> bool:
    """Whether the sparse path beats the masked dense matmul for ``rows`` token rows.

    ``device`` is "cpu" or "cuda"; ``k`` the input width, ``ns`` the outputs sharing the input
    (``gated``: ``[d_ff]`` of a gated MLP whose up/down are skipped); ``sparsity`` the
    calibrated sparsity (None: unknown, take the sparse path where the rows allow it).
    """
    if rows < 1:
        return False
    if device == "cpu":
        return rows <= CPU_SPARSE_MAX_ROWS
    if device != "cuda" or rows > GPU_SPARSE_MAX_ROWS:
        return False
    if sparsity is None:
        return True
    if gated:
        return cost_model.gated_mlp_predict(rows, k, int(ns[0]), float(sparsity), nbytes)["speedup"] > 1.0
    return cost_model.prefer_sparse(rows, k, int(sum(ns)), float(sparsity), nbytes, against="fallback")


def triton_module(name: str) -> ModuleType | None:
    """``actsparse.kernels.triton.<name>`` where the Triton kernels can run here, else None."""
    from ..kernels import triton as tk

    if not tk.is_available():
        return None
    try:
        return importlib.import_module(f"actsparse.kernels.triton.{name}")
    except Exception:  # pragma: no cover - a broken Triton install: the dense paths still work
        return None


_FORCED: str | None = None
PATHS = ("triton", "cpu", "dense")


@contextmanager
def forced(path: str):
    """Take ``path`` wherever it can run, whatever the policy says (tests force every branch
    with it: "triton" also takes CPU tensors under Triton's interpreter)."""
    global _FORCED
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    old, _FORCED = _FORCED, path
    try:
        yield
    finally:
        _FORCED = old


def choose(x2: torch.Tensor, k: int, ns: Sequence[int], sparsity: float | None, nbytes: int,
           gated: bool = False) -> tuple[str, ModuleType | None]:
    """The path of one call on rows ``x2`` [M, K]: ("triton", kernel module), ("cpu", None) for
    the CPU sparse paths, or ("dense", None) for the masked dense form."""
    from ..kernels import triton as tk

    rows = x2.shape[0]
    if _FORCED is not None:
        if _FORCED == "triton" and tk.runs_on(x2):
            mod = triton_module("gated_mlp" if gated else "sparse_gemv")
            if mod is not None and (mod.supports(rows) if gated else mod.batch_path_enabled(rows)):
                return "triton", mod
        if _FORCED == "cpu" and not x2.is_cuda and rows > 0:
            return "cpu", None
        return "dense", None
    if x2.is_cuda:
        if sparse_pays("cuda", rows, k, ns, sparsity, nbytes, gated) and tk.runs_on(x2):
            mod = triton_module("gated_mlp" if gated else "sparse_gemv")
            if mod is not None and (mod.supports(rows) if gated else mod.batch_path_enabled(rows)):
                return "triton", mod
        return "dense", None
    if x2.device.type == "cpu" and sparse_pays("cpu", rows, k, ns, sparsity, nbytes, gated):
        return "cpu", None
    return "dense", None
