"""The actsparse ops the passes insert, one file each, and what they share.

Each op file holds the op's schema (a ``torch.library`` custom op), its fake implementation,
its dispatch (sparse kernel, CPU path or masked dense form) and which of its arguments are
input-sparse weights (``spec.OpSpec``). ``reference`` is the one pure-torch definition of
every op; ``dispatch`` the one dense-or-sparse decision; ``limits`` the row limits;
``constants`` the tensors the backend owns for them. Every module of the package is imported
here, so a new op is one new file.
"""

import importlib
import pkgutil

from . import (cached_sparse_linear, channel_sparse_linear, constants, dense, dispatch, gated_mlp,  # noqa: F401
               head_sparse_attention, limits, predict_mask, predicted_mlp, reference, route_heads, sparse_linear)
from .spec import OPS, OpSpec, bound_args, input_sparse_weights, reserve, spec_of

for _mod in pkgutil.iter_modules(__path__):  # ops beyond the ones named above register on import
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["OPS", "OpSpec", "bound_args", "constants", "dense", "dispatch", "input_sparse_weights", "limits",
           "reference", "reserve", "spec_of"]
