"""Greedy decoding with no host sync per token: the loop the GPU speedups were measured in.

HF ``generate`` checks its stopping criteria on the host after every token, so the host waits
for the GPU every step and its own Python time adds to every token, which eats into the gain
of faster kernels (the end-to-end benchmarks compare both loops). This loop
keeps the per-token work on the device: the next token is the argmax of the last logits, the
cache position advances in place, rows that have produced an end-of-sequence token are held
at the pad token, and the host reads the end-of-sequence flags only every ``check_every``
tokens. Its output is the same as ``model.generate(..., do_sample=False)``.

    out = actsparse.greedy_decode(model, input_ids, 128, backend=actsparse.backend(plan, cudagraphs=True))
"""

from __future__ import annotations

import inspect

import weakref
from typing import Any, Callable, Optional, Sequence, Union

import torch

#: Compiled decode steps, per model and backend: a second call reuses the compiled graphs.
_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, Callable]]" = weakref.WeakKeyDictionary()


def _step_for(model: torch.nn.Module, backend: Union[str, Callable, None]) -> Callable:
    if backend is None:
        return model.forward
    per_model = _STEPS.setdefault(model, {})
    if backend not in per_model:
        per_model[backend] = torch.compile(model.forward, backend=backend, fullgraph=True)
    return per_model[backend]


#: One static KV cache per model, kept for the next call: see `_static_cache`.
_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, Any]]" = weakref.WeakKeyDictionary()
CACHE_BUCKET = 128  # cache lengths are rounded up to a multiple of this


def _static_cache(model: torch.nn.Module, batch: int, length: int, device: torch.device):
    """A zeroed HF StaticCache for `batch` rows and at least `length` positions.

    A CUDA-graph tree records its graphs for the addresses of the cache's tensors; a new cache
    on every call moves them, and the step is recorded again (counter
    `cudagraph_recorded_non_static_inputs`; benchmarks/studies/gpu_greedy_check.py).
    So the last cache is kept per model and reused, zeroed, when the batch size matches and the
    length falls in the same bucket. `release_cache(model)` frees it.
    """
    from transformers import StaticCache

    want = -(-length // CACHE_BUCKET) * CACHE_BUCKET
    dtype = next(model.parameters()).dtype
    key = (batch, want, str(device), dtype)
    hit = _CACHES.get(model)
    if hit is not None and hit[0] == key:
        hit[1].reset()
        return hit[1]
    _CACHES.pop(model, None)
    try:
        cache = StaticCache(config=model.config, max_cache_len=want)
    except Exception as e:  # noqa: BLE001 - say which model, keep the cause
        raise ValueError(f"greedy_decode needs a model that supports HF's StaticCache "
                         f"({type(model).__name__} does not: {e})") from e
    _CACHES[model] = (key, cache)
    return cache


def _last_logits_only(model: torch.nn.Module) -> dict:
    """``logits_to_keep=1`` where the model takes it: the prefill needs the last position's
    logits only, and all of them (batch x length x vocabulary) can outweigh the model."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def release_cache(model: torch.nn.Module) -> None:
    """Free the KV cache `greedy_decode` keeps for `model` between calls."""
    _CACHES.pop(model, None)


def _token_ids(value: Union[int, Sequence[int], None]) -> Optional[list[int]]:
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else list(value)
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of token ids, got {value!r}")
    return ids


def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                  backend: Union[str, Callable, None] = None,
                  eos_token_id: Union[int, Sequence[int], None] = None,
                  pad_token_id: Optional[int] = None, check_every: int = 16,
                  ignore_eos: bool = False, cache_length: Optional[int] = None) -> torch.Tensor:
    """Greedy tokens for ``input_ids`` ([batch, length], no padding), prompt included.

    backend: what ``torch.compile`` gets for the decode step (``actsparse.backend(plan,
    cudagraphs=True)``, ``"inductor"``, ...); None runs the model eagerly. The prefill runs
    eagerly, so it is dense, as under HF ``generate`` with a ``compile_config`` (a compiled
    prefill followed by compiled steps on a new static cache is where CUDA-graph trees failed
    with torch 2.11; the README lists it). eos_token_id / pad_token_id default to the model's generation config; a row
    stops at its first end-of-sequence token and is padded after it, and decoding ends once
    every row has stopped (the host checks every ``check_every`` tokens; the result is trimmed
    as ``generate`` trims it). ignore_eos: always produce ``max_new_tokens`` tokens (benchmarks).
    The KV cache is kept for the next call (see ``_static_cache``; ``release_cache`` frees it).
    cache_length: positions the KV cache holds, at least prompt + new tokens (default: that,
    rounded up to 128). Calls that ask for one length keep one cache, and so one recorded CUDA
    graph, whatever their prompt and token counts.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a [batch, length] tensor of token ids (torch.long)")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    need = input_ids.shape[1] + max_new_tokens
    if cache_length is not None and (not isinstance(cache_length, int) or cache_length < need):
        raise ValueError(f"cache_length must be an int >= prompt length + max_new_tokens ({need}), "
                         f"got {cache_length!r}")
    gen = getattr(model, "generation_config", None)
    eos = None if ignore_eos else _token_ids(
        eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
        if pad_token_id is None and eos is not None:
            pad_token_id = eos[0]  # what generate does when the model names no pad token
    b, n = input_ids.shape
    device = input_ids.device
    out = torch.empty((b, n + max_new_tokens), dtype=torch.long, device=device)
    out[:, :n] = input_ids
    if max_new_tokens == 0:
        return out

    cache = _static_cache(model, b, cache_length if cache_length is not None else need, device)
    step = _step_for(model, backend)
    eos_t = torch.tensor(eos, device=device) if eos is not None else None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    last = torch.full((b,), max_new_tokens - 1, dtype=torch.long, device=device)  # step a row stopped
    with torch.no_grad():
        logits = model(input_ids=input_ids, past_key_values=cache,
                       cache_position=torch.arange(n, device=device), **_last_logits_only(model)).logits
        tok = logits[:, -1:].argmax(-1)
        pos = torch.tensor([n], device=device)
        for i in range(max_new_tokens):
            if eos_t is not None:
                tok = torch.where(done[:, None], torch.full_like(tok, pad_token_id), tok)
                stops = ~done & torch.isin(tok[:, 0], eos_t)
                last = torch.where(stops, torch.full_like(last, i), last)
                done = done | stops
            out[:, n + i] = tok[:, 0]
            if i == max_new_tokens - 1:
                break
            if eos_t is not None and (i + 1) % check_every == 0 and bool(done.all()):
                break  # the only host sync: every check_every tokens
            logits = step(input_ids=tok, past_key_values=cache, cache_position=pos).logits
            tok = logits[:, -1:].argmax(-1)
            pos += 1  # in place, on the device: no host-to-device copy that would wait for the GPU
    if eos_t is not None and bool(done.all()):
        return out[:, : n + int(last.max()) + 1]
    return out
