"""PlanError and the field checks every part of a plan file goes through.

A plan is read from a file a user may have edited by hand, so every field is checked for its
type and range, and a failure names the field and what was expected (never a bare
``ValueError`` from deep inside a conversion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class PlanError(ValueError):
    """A plan that does not fit the model, or a malformed plan file."""


def _kind(value: Any) -> str:
    return type(value).__name__


def expect_mapping(value: Any, field: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise PlanError(f"{field} must be a mapping (a JSON object), got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise PlanError(f"{field}: keys must be strings, got {key!r}")
    return value


def expect_number(value: Any, field: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) in the given range; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{field} must be a finite number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise PlanError(f"{field} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise PlanError(f"{field} must be {'<' if high_open else '<='} {high:g}, got {value!r}")
    return v


def expect_optional_number(value: Any, field: str, **limits) -> float | None:
    return None if value is None else expect_number(value, field, **limits)


def expect_int(value: Any, field: str, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{field} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise PlanError(f"{field} must be an integer >= {low}, got {value!r}")
    return value


def expect_str(value: Any, field: str, allowed: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise PlanError(f"{field} must be a string, got {_kind(value)}")
    if allowed is not None and value not in allowed:
        raise PlanError(f"{field} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def expect_list(value: Any, field: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise PlanError(f"{field} must be a list, got {_kind(value)}")
    return list(value)


def number_map(value: Any, field: str, **limits) -> dict[str, float]:
    """A mapping of module name -> number (thresholds, measured sparsities)."""
    return {k: expect_number(v, f"{field}[{k!r}]", **limits) for k, v in expect_mapping(value, field).items()}


def short_list(items: list[str], n: int = 8) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")
