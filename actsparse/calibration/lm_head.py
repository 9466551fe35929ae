"""Optional LM-head sparsity: a TEAL threshold on the output head's input (off by default).

The head's input (the final norm's output) is a linear input like any other, and the head is
a large read per decoded token (about 1 GB of Llama-3-8B's 15 GB in bf16; more, relative to
the rest, on small models with large vocabularies). It is left out of every method's target,
because its error goes straight into the logits: this adds it on request, calibrated as TEAL
calibrates the others (the quantile of the plan's score, |x| or WINA's, at the requested
sparsity, from a log-histogram over the calibration tokens, on the dense model), as an entry of the plan's input thresholds keyed
by the head's module name. The backend then masks the head like any named linear and stores
its weight input-major (for a head tied to the input embedding, the embedding lookups read
the same input-major storage: same values, other strides).
"""

from __future__ import annotations

from typing import Any

import torch

from ..plan import SparsityPlan, fingerprint
from .data import token_batches
from .histogram import LogHistogram
from .method import CalibrationError
from .statistics import no_cache


def head_name(model: torch.nn.Module) -> str:
    """The module name of the model's output head (a linear)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise CalibrationError("LM-head sparsity needs a model whose get_output_embeddings() is an nn.Linear")
    return next(n for n, m in model.named_modules() if m is head)


def tied_embedding(model: torch.nn.Module) -> str | None:
    """The input embedding's module name where the head shares its weight, else None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_submodule(head_name(model))
    if emb is None or getattr(emb, "weight", None) is not head.weight:
        return None
    return next(n for n, m in model.named_modules() if m is emb)


def head_histogram(model: torch.nn.Module, batches: list[torch.Tensor], score: str = "abs") -> LogHistogram:
    """The head's input scores on ``batches`` (every position: calibration runs whole sequences):
    |x_i|, or WINA's |x_i| * ||W[:, i]|| (``score="wina"``), as the plan's thresholds compare."""
    head = model.get_submodule(head_name(model))
    hist = LogHistogram()
    device = next(model.parameters()).device
    scale = head.weight.detach().float().norm(dim=0) if score == "wina" else None

    def hook(_mod, args):
        hist.update(args[0], scale=scale)

    handle = head.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids.to(device), **no_cache(model))
    finally:
        handle.remove()
    return hist


def add_lm_head_sparsity(plan: SparsityPlan, model: torch.nn.Module, tokens_or_texts, sparsity: float,
                         tokenizer=None, **data: Any) -> SparsityPlan:
    """Add a threshold on the head's input at ``sparsity`` to ``plan`` (in place).

    ``data``: ``token_budget``, ``batch_size``, ``seq_len``, ``seed`` as for calibration.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise CalibrationError(f"lm_head_sparsity must be a number in (0, 1), got {sparsity!r}")
    name = head_name(model)
    batches, info = token_batches(tokens_or_texts, tokenizer, **data)
    hist = head_histogram(model, batches, plan.score)
    t = hist.quantile(float(sparsity))
    plan.thresholds = {**plan.thresholds, name: t}
    plan.measured[name] = round(hist.cdf(t), 6)
    plan.info["lm_head"] = {"module": name, "target": float(sparsity), "tokens": info["tokens"]}
    tied = tied_embedding(model)
    if tied is not None:  # Dynamo names the shared weight after the embedding: the backend maps it back
        plan.info["lm_head"]["traced_as"] = tied
    if plan.model is None:
        plan.model = fingerprint(model)
    plan.validate(model)
    return plan
