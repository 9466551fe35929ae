"""Small valid plans and rules, built by hand (no model needed), shared by the plan tests."""

from __future__ import annotations

import copy
from typing import Any

import torch

from actsparse.plan import FORMAT, Predictors

# a made-up model: one attention input, one gated MLP "mlp" with 4 inputs and 6 neurons
D, N, RANK = 4, 6, 2
WEIGHTS = {"attn.q": [4, 4], "attn.o": [4, 4], "mlp.gate": [N, D], "mlp.up": [N, D], "mlp.down": [D, N],
           "mlp2.gate": [N, D], "mlp2.up": [N, D], "mlp2.down": [D, N]}


def spec(prefix: str = "mlp", **changes: Any) -> dict[str, Any]:
    """A valid predictor spec for the MLP ``prefix`` (keyed by ``prefix + ".down"``)."""
    s = {"gate": f"{prefix}.gate", "up": f"{prefix}.up", "act": "silu", "rank": RANK, "in_features": D,
         "neurons": N, "selection": "topk", "keep": 3, "threshold": 0.25}
    s.update(changes)
    return s


def predictor_tensors(down: str = "mlp.down", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{down}.w1": torch.randn(RANK, D, generator=g), f"{down}.w2": torch.randn(N, RANK, generator=g),
            f"{down}.b2": torch.randn(N, generator=g)}


def predictors(seed: int = 0) -> Predictors:
    return Predictors({"mlp.down": spec()}, predictor_tensors(seed=seed))


def plan_dict() -> dict[str, Any]:
    """A valid plan file's JSON with every kind of field (predictors on mlp2, CATS on mlp)."""
    return copy.deepcopy({
        "format": FORMAT, "version": 2, "method": "teal", "target": 0.5, "overall_sparsity": 0.48,
        "roles": {"attn.q": "attn_in", "mlp.down": "mlp_down"},
        "measured": {"attn.q": 0.5, "mlp.down": 0.45},
        "model": {"architecture": "TinyForCausalLM", "weights": WEIGHTS},
        "info": {"seed": 0, "source": {"name": "wiki", "rows": [8, 16]}, "note": None},
        "thresholds": {"attn.q": 0.1, "attn.o": 0.0}, "score": "abs",
        "activation_thresholds": {"mlp.down": 0.3},
        "stat_topk": {"sparsity": 0.4, "roles": ["attn_in", "mlp_down"], "distribution": "gaussian"},
        "predictors": {"mlp2.down": spec("mlp2")},
    })


def plan_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """The sidecar tensors of ``plan_dict()``, keyed as the sidecar keys them."""
    return {f"predictors/{k}": v for k, v in predictor_tensors("mlp2.down", seed).items()}
