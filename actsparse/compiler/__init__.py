"""The torch.compile backend: options, Inductor hand-off, weight layout, fallbacks."""

from .backend import SparseBackend, backend, sparse_backend
from .layout import prepare

__all__ = ["SparseBackend", "backend", "sparse_backend", "prepare"]
