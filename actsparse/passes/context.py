"""What the passes of one graph share: the plan, the sites found, counters, constants."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ops.constants import ConstantScope
from ..plan import SparsityPlan
from .find_sites import Site


@dataclass
class RewriteStats:
    """What the rewrites did: counts for tests, names for the unfound-rule report."""

    sparse_linear_calls: int = 0
    gated_mlp_calls: int = 0
    predicted_mlp_calls: int = 0
    expert_mlp_calls: int = 0
    head_attention_calls: int = 0
    gqa_attention_calls: int = 0
    gated_product_calls: int = 0
    masked_sites: int = 0
    found_rules: set[str] = field(default_factory=set)
    unresolved: list[str] = field(default_factory=list)  # site names no plan name fits


@dataclass
class PassContext:
    plan: SparsityPlan
    sites: list[Site] = field(default_factory=list)
    #: graph module name -> plan module name (see resolve_names)
    names: dict[str, str] = field(default_factory=dict)
    stats: RewriteStats = field(default_factory=RewriteStats)
    #: placeholder positions of weights the inserted ops read input-sparse
    input_major_inputs: list[int] = field(default_factory=list)
    #: tensors the inserted ops read (WINA cutoffs, predictor weights), released with the graph
    constants: ConstantScope = field(default_factory=ConstantScope)
    #: graph module name -> (threshold, expected sparsity) of exact masks a pass implies (o_proj
    #: after head routing: its input is zero on whole unselected heads)
    implied_thresholds: dict[str, tuple[float, float]] = field(default_factory=dict)
    table: str = ""
    #: point SDPA at the cache per KV head (``gqa_attention``) instead of HF's repeated copies
    gqa_attention: bool = True
    #: fold a gated MLP's product into its gate/up call (``fuse_gated_product``)
    fuse_gated_product: bool | str = "auto"

    def hint(self, plan_name: str | None) -> float:
        """The calibrated sparsity of a site (measured, else the plan's target, else 0)."""
        v = self.plan.measured.get(plan_name or "", self.plan.target or 0.0)
        return float(v or 0.0)
