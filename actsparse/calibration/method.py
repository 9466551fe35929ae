"""Calibration methods: a registered class per method, turning statistics into plan rules.

A method says which statistics it needs from the calibration pass (``needs``), which options
it accepts (``options``), and makes its rules from a ``Calibrator``'s statistics (``make``).
Methods that train on their own pass (learned predictors) override ``calibrate`` instead.
``calibrate(model, data, method=...)`` and ``Calibrator.plan(method, ...)`` look methods up
here, so a new method is one registered class plus its import in ``calibration/__init__``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..plan import Rule

if TYPE_CHECKING:  # pragma: no cover
    from ..plan import SparsityPlan
    from .calibrator import Calibrator


#: What the target counts for methods that mask MLP neurons (the plan's info says it).
MLP_SCOPE = "MLP neurons (up/down columns)"


class CalibrationError(ValueError):
    """Bad calibration arguments (method, options, sparsity, data)."""


def check_sparsity(sparsity: Any, what: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise CalibrationError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


@dataclass
class Made:
    """What a method made: its rules, the sparsity they give per linear on the calibration data,
    what it adds to the plan's info, and the target it reached (None: no sparsity target)."""

    rules: list[Rule]
    measured: dict[str, float]
    target: float | None
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    """One calibration method; subclasses are registered with ``register_method``."""

    name: ClassVar[str] = ""
    #: Statistics the calibration pass must gather (see ``statistics.Statistics``).
    needs: ClassVar[tuple[str, ...]] = ()
    #: Keyword options the method accepts -> what they mean (for error messages and the CLI).
    options: ClassVar[dict[str, str]] = {}
    #: What the target sparsity counts (the plan's info says it).
    target_scope: ClassVar[str] = ""
    #: Whether ``make`` works from a Calibrator's statistics (False: the method has its own pass).
    from_statistics: ClassVar[bool] = True
    #: Whether the target is a head sparsity (then ``calibrate(head_density=d)`` means target 1 - d).
    targets_heads: ClassVar[bool] = False

    def needs_with(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The statistics needed with these options (WINA scores need their own)."""
        return self.needs

    def check_target(self, sparsity: Any, options: Mapping[str, Any]) -> float | None:
        """The validated target; a method may accept None with some options (CETT's budget)."""
        return check_sparsity(sparsity)

    def make(self, cal: Calibrator, sparsity: float | None, **options: Any) -> Made:
        raise NotImplementedError

    def calibrate(self, model: torch.nn.Module, tokens_or_texts, sparsity: float | None, tokenizer=None,
                  *, calibrator_args: Mapping[str, Any], options: Mapping[str, Any]) -> SparsityPlan:
        """A plan from data: one statistics pass, then ``make``."""
        from .calibrator import Calibrator

        cal = Calibrator(model, tokens_or_texts, tokenizer, methods=(self.name,),
                         needs=self.needs_with(options), **calibrator_args)
        return cal.plan(self.name, sparsity, **options)


METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a calibration method available by its name."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set name")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    m = METHODS.get(name) if isinstance(name, str) else None
    if m is None:
        raise CalibrationError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return m


def check_options(method: Method, options: Mapping[str, Any]) -> None:
    """Every option must be one the method takes; the error names the methods that take it."""
    for key, value in options.items():
        if key in method.options:
            continue
        takers = [m.name for m in METHODS.values() if key in m.options]
        if takers:
            raise CalibrationError(f"{key} applies to method{'s' if len(takers) > 1 else ''} "
                                   f"{', '.join(takers)} only, not {method.name!r}")
        raise CalibrationError(f"unknown option {key!r} for method {method.name!r}; it takes: "
                               f"{', '.join(method.options) or 'no options'}")
