"""Sparsity plans: typed rules per module, the model's fingerprint, JSON + safetensors files.

    plan = SparsityPlan.from_thresholds(model, {"model.layers.0.mlp.down_proj": 0.05})
    plan.save("plan.json"); plan = SparsityPlan.load("plan.json", model=model)
"""

from .checks import PlanError
from .files import FORMAT, VERSION, sidecar_path
from .fingerprint import fingerprint, linear_weights
from .plan import SparsityPlan
from .rules import (DISTRIBUTIONS, ROLES, RULE_KINDS, SCORES, SELECTIONS, ActivationThresholds, HeadRouting,
                    InputThresholds,
                    Predictors, Rule, StatTopK, normal_ppf, register_rule)

__all__ = ["ActivationThresholds", "DISTRIBUTIONS", "FORMAT", "HeadRouting", "InputThresholds", "PlanError", "Predictors", "ROLES",
           "RULE_KINDS", "Rule", "SCORES", "SELECTIONS", "SparsityPlan", "StatTopK", "VERSION", "fingerprint",
           "linear_weights", "normal_ppf", "register_rule", "sidecar_path"]
