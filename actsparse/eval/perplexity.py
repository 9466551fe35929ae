"""Perplexity of a causal LM over a text, in fixed or sliding context windows.

Computed from the model's logits (fp32 log-softmax) rather than from its loss,
so any causal LM that returns logits works, compiled or not, sparse or dense.

Windows. The text is tokenised once, without special tokens, into ``ids``
(length ``n``). Window ``k`` feeds ``window`` tokens ``ids[b : b + window]``
(``b = k * stride``) and its logits predict ``ids[b + 1 : b + window + 1]``.
The first window scores all ``window`` predictions; each later window scores
only its last ``stride`` predictions, so every token from ``ids[1]`` on is
scored at most once and with at least ``window - stride`` tokens of context.
``stride == window`` (the default) gives disjoint windows. Only full windows are
used, so one window needs ``window + 1`` tokens; the tail that does not fill a
window is dropped. If the tokenizer adds a BOS token by default (Gemma), a BOS
is put in front of every window as extra context (it is not scored): models
trained always to see one degrade badly without it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch

_LOGPROB_CHUNK_FLOATS = 1 << 26  # bounds the fp32 log-softmax buffer (256 MiB)
_LOGITS_BATCH_FLOATS = 1 << 29  # bounds a batch's logits (2 GiB in fp32)


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``, ``nll`` the mean negative log-likelihood per scored token."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


# --- helpers shared with tasks.py -------------------------------------------------


def model_device(model) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless callable)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _accepts_use_cache(model) -> bool:
    fwd = getattr(model, "forward", model)
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params


def forward_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of a causal LM; no KV cache is built when avoidable."""
    kwargs = {"use_cache": False} if _accepts_use_cache(model) else {}
    out = model(input_ids=input_ids, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0]
    return logits


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (fp32) of ``targets`` under ``logits`` and whether each is the argmax.

    ``logits`` is ``[n, vocab]``, ``targets`` ``[n]``. Works in row chunks so a
    large vocabulary (Gemma: 262k) does not need a full fp32 copy of the logits.
    """
    n, vocab = logits.shape
    step = max(1, _LOGPROB_CHUNK_FLOATS // max(1, vocab))
    lps, greedy = [], []
    for s in range(0, n, step):
        lp = logits[s : s + step].float().log_softmax(dim=-1)
        t = targets[s : s + step].to(lp.device).unsqueeze(-1)
        lps.append(lp.gather(-1, t).squeeze(-1))
        greedy.append(lp.argmax(dim=-1) == t.squeeze(-1))
    return torch.cat(lps), torch.cat(greedy)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front by default (Gemma: yes; SmolLM2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (and no too-long-sequence warning)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def progress_bar(iterable, *, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


# --- perplexity -------------------------------------------------------------------


def window_starts(n_tokens: int, window: int, stride: int, max_tokens: int | None = None) -> list[int]:
    """Start offsets of the windows (see module docstring); raises if none fits."""
    if n_tokens < window + 1:
        raise ValueError(
            f"text has {n_tokens} tokens but one window of {window} needs {window + 1} "
            f"(window inputs plus the next token); use a longer text or a smaller window"
        )
    count = 1 + (n_tokens - window - 1) // stride
    if max_tokens is not None:
        if max_tokens < window:
            raise ValueError(
                f"token budget max_tokens={max_tokens} is smaller than the first window, "
                f"which scores {window} tokens; raise it or lower the window"
            )
        count = min(count, 1 + (max_tokens - window) // stride)
    return [k * stride for k in range(count)]


def perplexity(
    model,
    tokenizer,
    text: str | None = None,
    *,
    data_dir=None,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    add_bos: bool | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: the WikiText-2 test split).

    ``stride`` (default ``window``) below ``window`` gives sliding windows.
    ``max_tokens`` caps the tokens scored by taking the first windows only (so
    a budget is deterministic and results with budgets are comparable).
    ``add_bos`` None follows the tokenizer's default (see module docstring).
    """
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window={window}, got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if text is None:
        from .data import load_wikitext2

        text = load_wikitext2(data_dir)
    if not text or not text.strip():
        raise ValueError("cannot compute perplexity of an empty text")

    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    starts = window_starts(len(ids), window, stride, max_tokens)
    if add_bos is None:
        add_bos = adds_bos(tokenizer)
    prefix = [tokenizer.bos_token_id] if add_bos else []

    # Fewer windows per batch when the logits alone would pass ~2 GiB (Gemma's 262k vocabulary).
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    batch_size = max(1, min(batch_size, _LOGITS_BATCH_FLOATS // ((window + len(prefix)) * vocab)))

    device = model_device(model)
    total_nll = 0.0  # float64 accumulation on the host
    total_tokens = 0
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    with torch.inference_mode():
        for batch in progress_bar(batches, total=len(batches), desc="perplexity", enabled=progress):
            rows = [torch.cat([torch.tensor(prefix, dtype=torch.long), ids[b : b + window]]) for b in batch]
            x = torch.stack(rows).to(device)
            logits = forward_logits(model, x)[:, len(prefix) :]  # predicts ids[b+1 : b+window+1]
            for r, b in enumerate(batch):
                first = 0 if b == 0 else window - stride
                targets = ids[b + 1 + first : b + window + 1]
                lp, _ = token_logprobs(logits[r, first:], targets)
                total_nll -= float(lp.double().sum())
                total_tokens += len(targets)

    nll = total_nll / total_tokens
    ppl = math.exp(nll) if nll < 700 else math.inf
    return PerplexityResult(ppl=ppl, nll=nll, tokens=total_tokens, windows=len(starts), window=window, stride=stride)
