"""Independent eager references for tests: masks applied by module hooks, not by the passes."""

from __future__ import annotations

import torch
from transformers import StaticCache

from actsparse.eval.masked import masked  # noqa: F401  (the hook reference, re-exported for the tests)


def prefill_decode(fwd, model, ids: torch.Tensor, decode: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill over ``ids`` then one decode step per column of ``decode``.

    The decode tokens are given (not argmax) so that two models that differ by rounding still
    see the same inputs.
    """
    b, n = ids.shape
    steps = decode.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 1)
    outs = []
    with torch.no_grad():
        out = fwd(input_ids=ids, past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(n))
        outs.append(out.logits)
        for i in range(steps):
            out = fwd(input_ids=decode[:, i:i + 1], past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([n + i]))
            outs.append(out.logits)
    return outs


def linear_names(model: torch.nn.Module) -> list[str]:
    """Every linear-like module except the output head: the sites a plan may mask."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head]
