"""Tensors the backend owns (WINA cutoffs, predictor weights), kept for the ops that read them.

A Dynamo graph takes no new inputs once traced, and Inductor does not take real tensors as
graph attributes, so a pass that needs a tensor of its own registers it here and gives the op
the key. The entries of one compiled graph form a ``ConstantScope``; the backend ties the
scope to the compiled callable it returns, so they live exactly as long as the compiled code
that reads them (freed when Dynamo drops it, e.g. on ``torch._dynamo.reset()``). The tensors
stay at fixed addresses, so CUDA graphs replay them.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager

from torch import Tensor

_STORE: dict[str, tuple[Tensor, ...]] = {}
_KEYS = itertools.count()
_WATCHERS: list[list[str]] = []  # open released_on_error blocks


class ConstantScope:
    """The constants registered while compiling one graph; released together."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def add(self, name: str, *tensors: Tensor) -> str:
        """Keep ``tensors`` for the ops; returns the key they are looked up by."""
        key = f"{name}#{next(_KEYS)}"
        _STORE[key] = tuple(tensors)
        self.keys.append(key)
        for w in _WATCHERS:
            w.append(key)
        return key

    def bind(self, owner: object) -> None:
        """Release this scope's entries when ``owner`` (the compiled callable) is freed."""
        if self.keys:
            weakref.finalize(owner, release, tuple(self.keys))


@contextmanager
def released_on_error():
    """Release the entries registered inside the block if it raises: a compilation that fails
    after a pass registered constants never binds them to a compiled graph, so nothing else would."""
    added: list[str] = []
    _WATCHERS.append(added)
    try:
        yield
    except BaseException:
        release(tuple(added))
        raise
    finally:
        _WATCHERS.remove(added)


def lookup(key: str) -> tuple[Tensor, ...]:
    try:
        return _STORE[key]
    except KeyError:
        raise RuntimeError(f"actsparse: constant {key!r} is not registered: the graph that used it was "
                           "released (compile the model with the plan again)") from None


def release(keys: tuple[str, ...]) -> None:
    for k in keys:
        _STORE.pop(k, None)


def live() -> int:
    """How many entries are held (tests check that compiled graphs release theirs)."""
    return len(_STORE)
