"""Rule kinds of a sparsity plan, one class each, registered by importing their module.

Every module of this package is imported here, so a new kind is one new file: its class,
decorated with ``register_rule``.
"""

import importlib
import pkgutil

from .activation_thresholds import ActivationThresholds
from .base import ROLES, RULE_KINDS, Rule, register_rule, rule_fields
from .head_routing import HeadRouting
from .input_thresholds import SCORES, InputThresholds
from .predictors import SELECTIONS, Predictors, check_predictor_clash
from .stat_topk import DISTRIBUTIONS, StatTopK, normal_ppf

for _mod in pkgutil.iter_modules(__path__):  # kinds beyond the ones named above
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ActivationThresholds", "DISTRIBUTIONS", "HeadRouting", "InputThresholds", "Predictors", "ROLES", "RULE_KINDS",
           "Rule", "SCORES", "SELECTIONS", "StatTopK", "check_predictor_clash", "normal_ppf",
           "register_rule", "rule_fields"]
