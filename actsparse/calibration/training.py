"""The small training loop the learned parts of a plan share (MLP predictors, head routers)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def train_minibatches(params: Sequence[torch.Tensor], loss_on: Callable[[torch.Tensor], torch.Tensor], rows: int,
                      *, epochs: int, batch_size: int, lr: float, generator: torch.Generator) -> tuple[float, float]:
    """Adam with cosine decay over shuffled minibatches of ``rows`` rows; ``loss_on(idx)`` is the
    loss of the rows ``idx``. Returns the mean loss of the first and of the last epoch."""
    opt = torch.optim.Adam(list(params), lr=lr)
    steps = epochs * max(1, math.ceil(rows / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    first = last = float("nan")
    for epoch in range(epochs):
        perm = torch.randperm(rows, generator=generator)
        run = 0.0
        for i in range(0, rows, batch_size):
            idx = perm[i:i + batch_size]
            loss = loss_on(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += loss.item() * len(idx)
        last = run / rows
        if epoch == 0:
            first = last
    return first, last
