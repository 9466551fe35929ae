"""Plan files: JSON for the rules, a safetensors sidecar for their tensors; never pickle.

``plan.json`` names its sidecar (``plan.json.safetensors``) and lists each tensor's shape, so a
sidecar from another plan, a missing tensor or a truncated file fails with a PlanError, not
with a wrong result. Writes are atomic: a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checks import (PlanError, expect_int, expect_list, expect_mapping, expect_optional_mapping, expect_str,
                     show)

FORMAT = "actsparse-plan"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where a plan file's tensors live: ``plan.json`` -> ``plan.json.safetensors``."""
    path = Path(path)
    return path.with_name(path.name + ".safetensors")


def write_plan(path: str | os.PathLike, data: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``data`` as JSON at ``path`` and ``tensors`` (if any) to its sidecar.

    Everything is serialised before anything is replaced, and both files are written to
    ``.tmp`` names first, so a failure leaves the old plan (and no ``.tmp`` file) behind.
    """
    path = Path(path)
    data = dict(data)
    cpu = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(tensors.items())}
    side = sidecar_path(path)
    if cpu:
        data["tensor_file"] = side.name
        data["tensors"] = {k: list(v.shape) for k, v in cpu.items()}
    try:
        text = json.dumps(data, indent=1, sort_keys=True)
    except (TypeError, ValueError) as e:  # e.g. a tensor left in ``info``
        raise PlanError(f"the plan cannot be written as JSON: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_side = path.with_name(path.name + ".tmp"), side.with_name(side.name + ".tmp")
    try:
        if cpu:
            from safetensors.torch import save_file

            save_file(cpu, str(tmp_side), metadata={"format": FORMAT + "-tensors"})
        tmp.write_text(text, encoding="utf-8")
        if cpu:
            os.replace(tmp_side, side)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_side.unlink(missing_ok=True)
    return path


def read_plan(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON of a plan file and its sidecar's tensors (keys as the plan lists them)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"plan file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise PlanError(f"{path} is not a text file (not UTF-8)") from None
    except RecursionError:
        raise PlanError(f"{path} is not a plan: its JSON is nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than int() reads
        raise PlanError(f"{path} is not a plan: {e}") from None
    data = dict(expect_mapping(data, "the plan file"))
    prefix = ""
    if _is_version(data.get("version"), 1):  # version 1: predictor weights only, keys unprefixed
        if "predictor_file" in data:
            data["tensor_file"] = data.pop("predictor_file")
            prefix = "predictors/"
        if "predictor_tensors" in data:
            listed = expect_optional_mapping(data.pop("predictor_tensors"), "predictor_tensors")
            data["tensors"] = {f"predictors/{k}": v for k, v in listed.items()}
    name = data.pop("tensor_file", None)
    listed = data.pop("tensors", None)
    if name is None:
        return data, {}
    return data, _read_sidecar(path, name, listed, prefix)


def _is_version(value: Any, version: int) -> bool:
    return type(value) is int and value == version  # not True (== 1), not 1.0


def _read_sidecar(path: Path, name: Any, listed: Any, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = expect_str(name, "tensor_file")
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise PlanError(f"{path}: tensor_file must be a file name next to the plan (no path), got {show(name)}")
    side = path.with_name(name)
    if not side.exists():
        raise PlanError(f"tensors of {path} not found: {side}")
    try:
        raw = load_file(str(side))
    except (SafetensorError, OSError, ValueError) as e:
        raise PlanError(f"{side} is not a readable safetensors file: {e}") from None
    tensors = {prefix + k: v for k, v in raw.items()}
    for k, shape in expect_mapping(listed if listed is not None else {}, "tensors").items():
        dims = [expect_int(x, f"tensors[{k!r}]", low=0) for x in expect_list(shape, f"tensors[{k!r}]")]
        if k not in tensors:
            raise PlanError(f"{side} lacks tensor {k!r} that {path.name} lists in tensors")
        if list(tensors[k].shape) != dims:
            raise PlanError(f"{side}: tensors[{k!r}] must have the shape the plan lists, {dims}, "
                            f"got {list(tensors[k].shape)}")
    return tensors
