"""actsparse: activation sparsity for LLM decoding, as a torch.compile backend.

    plan = actsparse.SparsityPlan.from_thresholds(model, {"model.layers.0.mlp.down_proj": 0.05})
    fast = torch.compile(model, backend="sparse", options={"plan": plan})
"""

from .compiler import backend, prepare
from .plan import PlanError, SparsityPlan

__all__ = ["SparsityPlan", "PlanError", "backend", "prepare"]
__version__ = "0.1.0"
