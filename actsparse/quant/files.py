"""Quantized weights saved and loaded: ``save_quantized(model, path)``, ``load_quantized(model, path)``.

GPTQ on a large model takes minutes to hours; its result should not have to be made twice. The
file is safetensors (never pickle): ``<module>.qweight``, ``.scales`` and, where present,
``.offsets`` and ``.bias`` of every ``QuantLinear``, as stored, and a JSON header with each
module's format and the model's fingerprint (architecture and linear shapes, as plans record
it). Loading takes the unquantized model (the same architecture, loaded as usual) and replaces
the file's modules in place, so a plan made on either applies. A file from another model, a
missing or misshapen tensor, or a module the model does not have fails with a ``ValueError``
that names it. Writes go to a temporary name first: a reader never sees half a file.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .linear import QuantLinear
from .storage import BITS, QuantizedWeight

FORMAT = "actsparse-quantized"
VERSION = 1
_HEADER = "actsparse"


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_quantized(model: nn.Module, path: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write every ``QuantLinear`` of ``model`` to ``path`` (safetensors); ``info``: anything
    JSON-serialisable to keep beside them (how they were made, say). Returns the path."""
    from safetensors.torch import save_file

    from ..plan.fingerprint import fingerprint

    mods = quantized_modules(model)
    if not mods:
        raise ValueError("the model has no quantized linears to save (actsparse.quantize or "
                         "models.load(..., keep_quantized=True) makes them)")
    header = {"format": FORMAT, "version": VERSION, "model": fingerprint(model), "info": info or {},
              "modules": {n: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
                              "out_features": m.out_features, "bias": m.bias is not None} for n, m in mods.items()}}
    try:
        text = json.dumps(header)
    except TypeError as e:
        raise ValueError(f"info must be JSON-serialisable: {e}") from None
    tensors = {}
    for n, m in mods.items():
        for key in ("qweight", "scales", "offsets", "bias"):
            t = getattr(m, key)
            if t is not None:
                tensors[f"{n}.{key}"] = t.detach().to("cpu").contiguous()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={_HEADER: text})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a quantized-weights file, checked for its format and version."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no quantized-weights file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(_HEADER)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types on bad files)
        raise ValueError(f"{path} is not a safetensors file: {e}") from None
    if text is None:
        raise ValueError(f"{path} is not an actsparse quantized-weights file (no '{_HEADER}' header)")
    header = json.loads(text)
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{path}: format {header.get('format')!r} version {header.get('version')!r}; this "
                         f"actsparse reads {FORMAT!r} version {VERSION}")
    return header


def _expected_shapes(spec: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The storage tensors' shapes for one module's format (``storage``'s layout)."""
    k, n, g, bits = spec["in_features"], spec["out_features"], spec["group_size"], spec["bits"]
    if bits not in BITS or (g and k % g) or (bits == 4 and not g):
        raise ValueError(f"int{bits} with group size {g} over {k} inputs is not a format this storage has")
    shapes = {"qweight": (k, n // 2 if bits == 4 else n), "scales": (k // g, n) if g else (n,)}
    if bits == 4:
        shapes["offsets"] = (k // g, n)
    if spec["bias"]:
        shapes["bias"] = (n,)
    return shapes


def _device(mod: nn.Module) -> torch.device:
    for t in itertools.chain(mod.parameters(), mod.buffers()):
        return t.device
    return torch.device("cpu")


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace ``model``'s linears by the quantized ones saved in ``path``, in place; returns the model.

    ``model`` is the architecture the file was saved from (its float weights are dropped for the
    file's); scales, offsets and biases take the dtype of the linear they replace, as
    ``quantize`` would have made them. Every check runs before anything is replaced."""
    from safetensors.torch import load_file

    from ..plan.checks import PlanError
    from ..plan.fingerprint import check_fingerprint, fingerprint, parse_fingerprint

    header = read_header(path)
    try:
        check_fingerprint(parse_fingerprint(header["model"]), fingerprint(model))
    except PlanError as e:
        raise ValueError(f"{path} holds another model's weights: {str(e).replace('plan was made', 'it was made')}") \
            from None
    tensors = load_file(str(path))
    mods = dict(model.named_modules())
    built: dict[str, QuantLinear] = {}
    for name, spec in header["modules"].items():
        target = mods.get(name)
        if not isinstance(target, nn.Linear):
            raise ValueError(f"{path}: the model has no linear {name!r} to replace")
        parts = {}
        dtype = target.scales.dtype if isinstance(target, QuantLinear) else target.weight.dtype  # scales as quantize makes them
        for key, shape in _expected_shapes(spec).items():
            t = tensors.get(f"{name}.{key}")
            if t is None or tuple(t.shape) != shape:
                got = "missing" if t is None else f"shape {list(t.shape)}"
                raise ValueError(f"{path}: {name}.{key} is {got}, its format needs {list(shape)}")
            parts[key] = t.to(_device(target), dtype=dtype if t.is_floating_point() else t.dtype)
        qw = QuantizedWeight(parts["qweight"], parts["scales"], parts.get("offsets"), spec["bits"],
                             spec["group_size"], spec["out_features"], spec["in_features"])
        built[name] = QuantLinear(qw, parts.get("bias"))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, layer in built.items():
        parent, _, child = name.rpartition(".")
        if mods[name] is head and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # the head is now its own (quantized) module
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model
