"""A plan under tensor parallelism: which rules hold per shard, and how they are sliced.

A plan is made once, on the unsharded model, and keeps global shapes (its fingerprint) and
global rules. Under tensor parallelism (Megatron style, as ``torch.distributed.tensor.parallel``
and Hugging Face's ``tp_plan`` shard a decoder) each rank holds a slice of every sharded linear:

* column-parallel (q/k/v, gate/up; ``Shard(0)`` of the [out, in] weight): the rank holds a slice
  of the output rows and sees the full input, so it masks the same input channels as every other
  rank (scalar thresholds hold as they are; WINA's per-channel cutoffs need the norm of the whole
  column, summed over ranks) and a gated MLP's neurons are sliced with the rows;
* row-parallel (o_proj, down_proj; ``Shard(1)``): the rank holds a slice of the input channels
  and sees only those, so it masks its own channels (scalar thresholds hold; WINA cutoffs are
  the rank's slice; a predictor's neuron mask is sliced to the rank's neurons).

Refused, with a ``PlanError`` that says why: statistical top-k on row-parallel sites (its
per-token scale ``mean |x|`` spans every rank's channels), head routing (each rank would need
the global top-k of units restricted to its own heads), and a degree that does not divide a
sharded dimension of a site the plan masks (slices would differ in size between ranks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .checks import PlanError, short_list
from .rules import ActivationThresholds, HeadRouting, InputThresholds, Predictors, StatTopK

#: The site roles whose linears are row-parallel under Megatron-style sharding.
ROW_PARALLEL_ROLES = ("attn_out", "mlp_down")


@dataclass(frozen=True)
class Shard:
    """How one linear's [out, in] weight is split: ``dim`` 0 (column-parallel: output rows) or
    1 (row-parallel: input channels), into ``degree`` slices of which this rank holds ``index``."""

    dim: int
    index: int
    degree: int

    def __post_init__(self) -> None:
        if self.dim not in (0, 1) or not 0 <= self.index < self.degree:
            raise ValueError(f"bad shard: dim {self.dim}, index {self.index} of {self.degree}")

    @property
    def style(self) -> str:
        return "column-parallel" if self.dim == 0 else "row-parallel"

    def divides(self, shape: tuple[int, int] | list[int]) -> bool:
        return shape[self.dim] % self.degree == 0

    def local_range(self, size: int) -> tuple[int, int]:
        """This rank's [lo, hi) of a global dimension of ``size`` that the degree divides."""
        if size % self.degree:
            raise PlanError(f"tensor-parallel degree {self.degree} does not divide {size}")
        step = size // self.degree
        return self.index * step, (self.index + 1) * step

    def local_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        out = list(shape)
        lo, hi = self.local_range(shape[self.dim])
        out[self.dim] = hi - lo
        return out[0], out[1]


@dataclass(frozen=True)
class ShardedSite:
    """What the checks need of one sharded linear: its plan name, site role and global shape."""

    name: str
    role: str
    shape: tuple[int, int]  # global [out, in]
    shard: Shard


def valid_degrees(dims: Iterable[int], limit: int = 64) -> list[int]:
    """The tensor-parallel degrees up to ``limit`` that divide every one of ``dims``."""
    g = 0
    for d in dims:
        g = math.gcd(g, int(d))
    return [k for k in range(1, limit + 1) if g % k == 0] if g else [1]


def degree_error(degree: int, bad: list[tuple[str, str, int]], all_dims: Iterable[int]) -> PlanError:
    """The error for a degree that does not divide some sharded dimensions.

    ``bad`` holds (module, what the dimension is, its size).
    """
    shown = [f"{name} ({what} {size})" for name, what, size in bad]
    ok = ", ".join(map(str, valid_degrees(all_dims)))
    return PlanError(f"tensor-parallel degree {degree} does not divide the sharded dimensions of "
                     f"{short_list(shown, 4)}: every rank must hold an equal slice for the plan's rules "
                     f"to be sliced to it; degrees that divide this model's shapes: {ok}")


def _dim_name(dim: int) -> str:
    return "output features" if dim == 0 else "input features"


def check_sharded_sites(plan, sites: Iterable[ShardedSite]) -> None:
    """Raise PlanError unless ``plan`` applies to these sharded sites (one rank's view).

    Checked: the degree divides every sharded dimension of a site the plan may mask (any site
    with a role, or one a rule names); no head routing; no statistical top-k on a row-parallel
    site that no other rule covers (other rules take precedence over it, as in the passes).
    """
    sites = [s for s in sites if s.shard.degree > 1]
    if not sites or plan.is_empty:
        return
    named = plan.rule_names()
    masked = [s for s in sites if s.role != "other" or s.name in named]
    bad = [(s.name, _dim_name(s.shard.dim), s.shape[s.shard.dim]) for s in masked if not s.shard.divides(s.shape)]
    if bad:
        raise degree_error(sites[0].shard.degree, bad, [s.shape[s.shard.dim] for s in masked])
    heads = plan.rule(HeadRouting)
    if heads is not None and not heads.is_empty():
        raise PlanError("head routing (plan.HeadRouting) is not supported under tensor parallelism: each rank "
                        "holds a slice of the heads and would need the global top-k of units restricted to "
                        "its own; run the plan's other rules with a plan without 'heads', or run unsharded")
    st = plan.rule(StatTopK)
    if st is not None and st.sparsity > 0:
        covered = set(plan.rule(InputThresholds).values) if plan.rule(InputThresholds) else set()
        acts = plan.rule(ActivationThresholds)
        covered |= set(acts.values) if acts else set()
        preds = plan.rule(Predictors)
        covered |= set(preds.claimed()) if preds else set()
        rows = sorted(s.name for s in sites if s.shard.dim == 1 and s.role in st.roles and s.name not in covered)
        if rows:
            raise stat_topk_error(rows)


def stat_topk_error(rows: list[str]) -> PlanError:
    return PlanError(
        f"statistical top-k on row-parallel sites ({short_list(rows, 4)}) is not supported under tensor "
        "parallelism: its per-token cutoff scales with mean|x| over all input channels, which are split "
        "over the ranks; give the backend a plan on column-parallel sites only, "
        "SparsityPlan.statistical(s, roles=('attn_in', 'mlp_in')) (they see the full input), or a calibrated "
        "plan (TEAL, CATS), whose thresholds hold per shard")


def check_plan_for_degree(plan, degree: int, shapes: Mapping[str, tuple[int, int]],
                          styles: Mapping[str, str], roles: Mapping[str, str] | None = None) -> None:
    """Before sharding: raise PlanError unless ``plan`` applies at ``degree`` to a model whose
    linears ``shapes`` (global [out, in]) are sharded as ``styles`` says (name -> "colwise" or
    "rowwise"). ``roles`` (name -> site role) where known; without it a row-parallel site counts
    as having the row-parallel role a statistical top-k rule names (the conservative reading)."""
    if degree < 1:
        raise PlanError(f"tensor-parallel degree must be >= 1, got {degree}")
    if degree == 1:
        return
    st = plan.rule(StatTopK)
    row_role = next((r for r in (st.roles if st else ()) if r in ROW_PARALLEL_ROLES), "mlp_down")
    sites = []
    for name, style in styles.items():
        if name not in shapes:
            continue
        dim = 0 if style == "colwise" else 1
        role = (roles or {}).get(name) or (row_role if dim == 1 else "mlp_in")
        sites.append(ShardedSite(name, role, tuple(shapes[name]), Shard(dim, 0, degree)))
    bad = [(s.name, _dim_name(s.shard.dim), s.shape[s.shard.dim]) for s in sites if not s.shard.divides(s.shape)]
    if bad:
        raise degree_error(degree, bad, [s.shape[s.shard.dim] for s in sites])
    check_sharded_sites(plan, sites)
