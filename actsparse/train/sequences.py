"""Teacher-sampled training sequences kept in a safetensors file, so a second fine-tune of the
same model (another recipe, another learning rate) skips the sampling, which is the slow part
of a short run on a CPU."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .distill import sample_sequences


def cached_sequences(teacher: nn.Module, samples: int, held_out: int, length: int, path: str | Path | None = None,
                     *, seed: int = 0, temperature: float = 1.0, top_k: int = 0, batch: int = 32
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(training [samples, length], held-out [held_out, length], seconds spent sampling).

    Read from ``path`` (tensors ``train`` and ``held_out``) when it holds exactly these shapes
    (0 seconds); otherwise sampled from ``teacher`` (``sample_sequences``, seeded) and, with a
    ``path``, written there for the next run."""
    from safetensors.torch import load_file, save_file

    device = next(teacher.parameters()).device
    p = Path(path) if path is not None else None
    if p is not None and p.is_file():
        got = load_file(str(p))
        if tuple(got.get("train", torch.empty(0)).shape) == (samples, length) \
                and tuple(got.get("held_out", torch.empty(0)).shape) == (held_out, length):
            return got["train"].to(device), got["held_out"].to(device), 0.0
    t0 = time.perf_counter()
    seqs = sample_sequences(teacher, samples + held_out, length, seed=seed, temperature=temperature, top_k=top_k,
                            batch=batch)
    secs = time.perf_counter() - t0
    train, held = seqs[:samples], seqs[samples:]
    if p is not None:
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file({"train": train.cpu().contiguous(), "held_out": held.cpu().contiguous()}, str(p))
    return train, held, secs


__all__ = ["cached_sequences"]
