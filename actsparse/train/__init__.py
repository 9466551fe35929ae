"""Training-time sparsity: relufication and the self-distillation fine-tune that recovers it."""

from .relufy import VARIANTS, gated_mlps, mlp_sparsity, relufy

__all__ = ["VARIANTS", "gated_mlps", "mlp_sparsity", "relufy"]
