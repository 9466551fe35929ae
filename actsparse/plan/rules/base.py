"""The base class of a plan's rule kinds, and their registry.

A rule kind is one way of deciding which inputs are zero (TEAL input thresholds, CATS
activation thresholds, statistical top-k, learned predictors, ...). Each kind is a class that
owns its fields of the plan file: it validates them (every error names the field), writes
them back, names the modules it refers to, and holds the tensors it needs (saved in the
plan's safetensors sidecar). ``SparsityPlan`` knows rules only through this interface, so a
new kind is one new class here plus the pass and op that lower it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..checks import PlanError, expect_mapping, short_list

#: The site roles a rule may name (see ``actsparse.passes.find_sites``).
ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_down")


class Rule:
    """One kind of rule in a plan; subclasses are registered with ``register_rule``."""

    #: Registry key, and the plan file's field for this kind.
    kind: ClassVar[str] = ""
    #: Every top-level field of the plan file this kind reads and writes.
    fields: ClassVar[tuple[str, ...]] = ()
    #: Whether the kind keeps tensors in the plan's sidecar (then ``load_tensors`` always runs).
    has_tensors: ClassVar[bool] = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rule | None:
        """This kind's rule from a plan file's top-level mapping; None if the file has none."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """This kind's top-level fields of the plan file."""
        raise NotImplementedError

    def is_empty(self) -> bool:
        return not self.modules()

    def modules(self) -> set[str]:
        """Every module name the rule refers to (checked against the model)."""
        return set()

    def input_major_modules(self, linears: list[str]) -> set[str]:
        """The linears whose weights this rule's ops read input-sparse (stored input-major).

        ``linears`` are the model's decoder linears (LM head excluded), for rules that apply to
        every site rather than to named modules.
        """
        return set()

    def check(self, shapes: Mapping[str, list[int]]) -> None:
        """Raise PlanError unless the rule fits a model with these linear weight shapes."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved in the plan's safetensors sidecar, by key (unique within the kind)."""
        return {}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take back the tensors ``tensors()`` saved (keys as given there)."""

    def describe(self) -> str:
        """A few words for ``SparsityPlan.summary``."""
        return self.kind


class PerModuleRule(Rule):
    """A rule kind whose plan field maps module names to one JSON spec each (``self.specs``),
    with its tensors in the sidecar: predictors, head routers, experts, R-Sparse factors."""

    specs: dict[str, dict[str, Any]]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PerModuleRule | None:
        specs = data.get(cls.fields[0])
        return None if specs is None else cls(specs)

    def to_json(self) -> dict[str, Any]:
        return {self.fields[0]: {n: dict(s) for n, s in self.specs.items()}}

    def modules(self) -> set[str]:
        return set(self.specs)

    def is_empty(self) -> bool:
        return not self.specs

    # -- tensors in the sidecar: every spec's tensors at the shapes ``tensor_shapes`` gives, no more
    #: The attribute holding the tensors by key, and the words messages use for them.
    tensor_attr: ClassVar[str] = "weights"
    tensor_label: ClassVar[str] = "rule tensors"
    tensor_owner: ClassVar[str] = "module"

    def tensor_shapes(self, name: str, spec: dict[str, Any]) -> dict[str, list[int]]:
        """The tensors one module's spec needs, by key (none unless a kind says otherwise)."""
        return {}

    def check_spec_tensors(self, name: str, spec: dict[str, Any]) -> None:
        """A kind's further checks of one module's tensors once their shapes are right."""

    def typed_tensors(self, value: Any) -> dict[str, torch.Tensor]:
        """``value`` as a dict of string keys to tensors, or PlanError."""
        value = expect_mapping(value, self.tensor_label)
        bad = [k for k, t in value.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise PlanError(f"{self.tensor_label} must be torch.Tensors, got {type(value[bad[0]]).__name__} "
                            f"for {short_list(bad)}")
        return dict(value)

    def tensors(self) -> dict[str, torch.Tensor]:
        self.check_tensors()
        held = getattr(self, self.tensor_attr)
        return {k: held[k] for k in sorted(held)}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        setattr(self, self.tensor_attr, self.typed_tensors(tensors))
        self.check_tensors()

    def check_tensors(self) -> None:
        """Raise PlanError unless every module has its tensors, of the shapes its spec implies, and
        every tensor belongs to a module (a sidecar of another plan is not silently carried)."""
        held = getattr(self, self.tensor_attr)
        wanted = set()
        for name, sp in self.specs.items():
            for key, shape in self.tensor_shapes(name, sp).items():
                wanted.add(key)
                t = held.get(key)
                if not isinstance(t, torch.Tensor):
                    raise PlanError(f"{self.kind}[{name!r}] has no tensor {key!r} (was the plan's "
                                    "safetensors file saved with it?)")
                if list(t.shape) != shape:
                    raise PlanError(f"{self.kind}[{name!r}]: tensor {key!r} must have shape {shape}, "
                                    f"got {list(t.shape)}")
            self.check_spec_tensors(name, sp)
        extra = sorted(set(held) - wanted)
        if extra:
            raise PlanError(f"{self.kind}: tensors {short_list(extra)} belong to no {self.tensor_owner} of the plan")


RULE_KINDS: dict[str, type[Rule]] = {}

#: Top-level fields of a plan file that belong to the plan itself (how and for which model it
#: was made) or to its file (the sidecar and its listing, and their version-1 names): no rule
#: kind may claim them.
PLAN_FIELDS = frozenset({"format", "version", "method", "target", "overall_sparsity", "roles", "measured",
                         "model", "info"})
FILE_FIELDS = frozenset({"tensor_file", "tensors", "predictor_file", "predictor_tensors"})


def _same_class(a: type, b: type) -> bool:
    """The same class, or the same class defined again (its module reloaded)."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make a rule kind known to plans (file reading, validation).

    Refused (TypeError) where the kind's name or one of its fields is another kind's, or a
    field is one of the plan's own: a plan file must say unambiguously which kind reads what.
    """
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise TypeError(f"register_rule takes a Rule subclass, got {cls!r}")
    if not cls.kind or not cls.fields:
        raise TypeError(f"{cls.__name__} must set kind and fields")
    if not isinstance(cls.kind, str) or "/" in cls.kind:
        raise TypeError(f"{cls.__name__}: kind must be a string without '/' (it prefixes tensor keys), "
                        f"got {cls.kind!r}")
    if isinstance(cls.fields, str) or not all(isinstance(f, str) for f in cls.fields):
        raise TypeError(f"{cls.__name__}: fields must be a tuple of strings, got {cls.fields!r}")
    other = RULE_KINDS.get(cls.kind)
    if other is not None and not _same_class(other, cls):
        raise TypeError(f"{cls.__name__}: rule kind {cls.kind!r} is already {other.__name__}")
    reserved = sorted(set(cls.fields) & (PLAN_FIELDS | FILE_FIELDS))
    if reserved:
        raise TypeError(f"{cls.__name__}: plan fields {reserved} belong to the plan itself, not to a rule kind")
    taken = {f: k for k in RULE_KINDS.values() if not _same_class(k, cls) for f in k.fields}
    clash = [f for f in cls.fields if f in taken]
    if clash:
        owners = sorted({taken[f].__name__ for f in clash})
        raise TypeError(f"{cls.__name__}: plan fields {clash} already belong to another rule kind "
                        f"({', '.join(owners)})")
    RULE_KINDS[cls.kind] = cls
    return cls


def rule_fields() -> set[str]:
    return {f for k in RULE_KINDS.values() for f in k.fields}
