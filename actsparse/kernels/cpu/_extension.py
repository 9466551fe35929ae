"""Build a native CPU kernel on first use, once per process, keyed by its source.

PyTorch's extension loader caches builds by name in one folder per user. The name carries a
hash of the source, so two checkouts (or two versions) of a kernel never rebuild over each
other or wait on each other's build lock. Where no compiler, headers or ninja are found,
``load()`` returns None after one warning and the op takes its pure-torch path.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path


class NativeExtension:
    """One C++ source file next to this module, compiled into a Python extension on demand."""

    def __init__(self, name: str, source: str, what: str, fallback: str):
        self.name, self.source, self.what, self.fallback = name, source, what, fallback
        self._lock = threading.Lock()
        self._module = None
        self._tried = False

    def load(self):
        """The compiled module, or None where it cannot be built."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._module = self._build()
                    self._tried = True
        return self._module

    def _build(self):
        from torch.utils.cpp_extension import load as load_extension

        src = Path(__file__).with_name(self.source)
        try:
            digest = hashlib.sha1(src.read_bytes()).hexdigest()[:12]
            return load_extension(name=f"{self.name}_{digest}", sources=[str(src)],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # noqa: BLE001 - no source, compiler, headers or ninja: the torch path still works
            first = str(e).splitlines()[0] if str(e) else ""
            warnings.warn(f"actsparse: {self.what} could not be built ({type(e).__name__}: {first}); "
                          f"{self.fallback}", stacklevel=4)
            return None
