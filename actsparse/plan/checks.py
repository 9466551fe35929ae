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


def show(value: Any, limit: int = 60) -> str:
    """A short repr for messages: never fails (ints past str()'s digit limit), never floods."""
    try:
        text = repr(value)
    except Exception:  # e.g. ValueError: int too large for str(); a broken __repr__
        text = f"<{_kind(value)}>"
    return text if len(text) <= limit else text[:limit - 5] + " ...>"


def expect_mapping(value: Any, field: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise PlanError(f"{field} must be a mapping (a JSON object), got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise PlanError(f"{field} must have string keys, got {show(key)}")
    return value


def expect_number(value: Any, field: str, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) in the given range; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{field} must be a finite number, got {show(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float is not finite for our purposes
        v = math.inf
    if not math.isfinite(v):
        raise PlanError(f"{field} must be a finite number, got {show(value)}")
    if low is not None and (v < low or (low_open and v == low)):
        raise PlanError(f"{field} must be {'>' if low_open else '>='} {low:g}, got {show(value)}")
    if high is not None and (v > high or (high_open and v == high)):
        raise PlanError(f"{field} must be {'<' if high_open else '<='} {high:g}, got {show(value)}")
    return v


def expect_optional_number(value: Any, field: str, **limits) -> float | None:
    return None if value is None else expect_number(value, field, **limits)


#: No count or size in a plan is larger (tensor shapes are int64); larger ones are typos or damage.
INT_MAX = 2**63 - 1


def expect_int(value: Any, field: str, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{field} must be an integer, got {show(value)}")
    if abs(value) > INT_MAX:
        raise PlanError(f"{field} must be an integer of at most 64 bits, got {show(value)}")
    if low is not None and value < low:
        raise PlanError(f"{field} must be an integer >= {low}, got {show(value)}")
    return value


def expect_str(value: Any, field: str, allowed: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise PlanError(f"{field} must be a string, got {_kind(value)}")
    if allowed is not None and value not in allowed:
        raise PlanError(f"{field} must be one of {', '.join(allowed)}, got {show(value)}")
    return value


def expect_optional_mapping(value: Any, field: str) -> Mapping:
    """A mapping, with None (JSON null, or the field left out) read as an empty one."""
    return {} if value is None else expect_mapping(value, field)


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
