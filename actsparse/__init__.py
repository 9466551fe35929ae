"""actsparse: activation sparsity for LLM decoding, as a torch.compile backend.

    plan = actsparse.SparsityPlan.from_thresholds(model, {"model.layers.0.mlp.down_proj": 0.05})
    fast = torch.compile(model, backend="sparse", options={"plan": plan})
"""

from . import distributed, models
from .compiler import backend, prepare
from .decode import greedy_decode
from .plan import PlanError, SparsityPlan
from .quant import quantize
from .train.moefy import moefy  # dense-to-MoE conversion: actsparse.train.moefy

__all__ = ["SparsityPlan", "PlanError", "backend", "prepare", "calibrate", "relufy", "greedy_decode", "models", "distributed", "quantize"]


def calibrate(model, tokens_or_texts, method: str = "teal-greedy", sparsity: float = 0.5, **kwargs):
    """Make a SparsityPlan from calibration text: see ``actsparse.calibration.calibrate``."""
    from .calibration import calibrate as _calibrate

    return _calibrate(model, tokens_or_texts, method=method, sparsity=sparsity, **kwargs)


def relufy(model, variant: str = "relu", **kwargs):
    """Swap the MLP activation for a ReLU variant; returns (model, exact plan): see ``actsparse.train.relufy``."""
    from .train import relufy as _relufy

    return _relufy(model, variant, **kwargs)


__version__ = "0.1.0"
