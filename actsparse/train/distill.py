"""Self-distillation: fine-tune a changed (relufied) student to match its dense teacher.

No corpus is shipped: the training sequences are sampled from the teacher itself (seeded), and
the loss is KL(teacher || student) on the next-token distributions, so the student learns the
teacher's function rather than any dataset's. Only LoRA adapters train (small files to bring
back from a GPU machine); an optional L1 term on the MLP down-projection inputs pushes more
neurons to exactly zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .lora import ALL_TARGETS, add_lora, lora_parameters
from .relufy import gated_mlps


@dataclass
class DistillConfig:
    """One fine-tune's settings; every field is checked by ``check``."""

    steps: int = 100
    batch_size: int = 4
    seq_len: int = 128
    samples: int = 64  # sequences sampled from the teacher (cycled through)
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    l1: float = 0.0  # weight of the sparsity regulariser (mean |down input|)
    temperature: float = 1.0  # sampling temperature of the teacher's sequences
    top_k: int = 0  # sample from the k most likely tokens (0: all)
    grad_clip: float = 1.0
    seed: int = 0
    max_seconds: float = 0.0  # stop after this much training time (0: run every step)

    def check(self) -> DistillConfig:
        for name in ("steps", "batch_size", "seq_len", "samples", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seq_len" else 1):
                raise ValueError(f"{name} must be an integer >= {2 if name == 'seq_len' else 1}, got {v!r}")
        for name, low_open in (("lr", True), ("alpha", True), ("temperature", True), ("l1", False),
                               ("grad_clip", True), ("max_seconds", False)):
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and \
                (v > 0 if low_open else v >= 0)
            if not ok:
                raise ValueError(f"{name} must be a finite number {'> 0' if low_open else '>= 0'}, got {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self.targets = tuple(self.targets)
        return self


@dataclass
class DistillResult:
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    tokens: int = 0  # training tokens seen (sequences x length x steps)
    seconds: float = 0.0
    sample_seconds: float = 0.0
    config: dict = field(default_factory=dict)


def _start_token(model: nn.Module) -> int:
    cfg = model.config
    for tok in (getattr(model.generation_config, "bos_token_id", None), getattr(cfg, "bos_token_id", None)):
        if isinstance(tok, int):
            return tok
    return 1


def sample_sequences(teacher: nn.Module, n: int, length: int, *, seed: int = 0, temperature: float = 1.0,
                     top_k: int = 0, batch: int = 16) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens sampled from ``teacher`` from its BOS token; seeded."""
    out = []
    start = _start_token(teacher)
    device = next(teacher.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(0, n, batch):
            b = min(batch, n - i)
            ids = torch.full((b, 1), start, dtype=torch.long, device=device)
            seq = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                   max_new_tokens=length - 1, min_new_tokens=length - 1, temperature=temperature,
                                   top_k=top_k or None, top_p=None, pad_token_id=start)
            out.append(seq[:, :length])
    return torch.cat(out)


def kl_teacher_student(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), in fp32."""
    t = F.log_softmax(t_logits.float(), -1)
    s = F.log_softmax(s_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def held_out_kl(student: nn.Module, teacher: nn.Module, sequences: torch.Tensor, batch: int = 8) -> float:
    """KL(teacher || student) averaged over ``sequences`` (no gradients): the fine-tune's measure."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(sequences), batch):
            ids = sequences[i:i + batch]
            total += float(kl_teacher_student(teacher(ids).logits, student(ids).logits)) * len(ids)
            n += len(ids)
    return total / max(n, 1)


class _DownInputs:
    """Collects the MLP down-projection inputs of one forward (for the L1 term)."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handles = [m.module.down_proj.register_forward_pre_hook(self._keep) for m in gated_mlps(model)]

    def _keep(self, mod, args):
        self.seen.append(args[0])

    def l1(self) -> torch.Tensor:
        v = torch.stack([h.abs().float().mean() for h in self.seen]).mean()
        self.seen.clear()
        return v

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def distill(student: nn.Module, teacher: nn.Module, config: DistillConfig | None = None, *,
            sequences: torch.Tensor | None = None, progress: bool | Callable[[int, dict], None] = False) -> DistillResult:
    """Fine-tune LoRA adapters on ``student`` (added here unless it has some) towards ``teacher``.

    ``sequences`` [N, T]: training tokens (default: ``config.samples`` sampled from the teacher).
    ``progress``: True for a progress bar, or a callback ``(step, values)``. The teacher is frozen.
    """
    cfg = (config or DistillConfig()).check()
    res = DistillResult(config=asdict(cfg))
    t0 = time.perf_counter()
    if sequences is None:
        sequences = sample_sequences(teacher, cfg.samples, cfg.seq_len, seed=cfg.seed,
                                     temperature=cfg.temperature, top_k=cfg.top_k)
    res.sample_seconds = time.perf_counter() - t0
    params = lora_parameters(student)
    if not params:
        add_lora(student, cfg.targets, cfg.rank, cfg.alpha, seed=cfg.seed)
        params = lora_parameters(student)
    teacher.eval().requires_grad_(False)  # frozen: it only gives the targets
    student.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = warmup_schedule(opt, cfg.steps)
    downs = _DownInputs(student) if cfg.l1 > 0 else None
    bar = _bar(cfg.steps) if progress is True else None
    t1 = time.perf_counter()
    try:
        for step, ids in enumerate(shuffled_batches(sequences, cfg.batch_size, cfg.steps, cfg.seed)):
            with torch.no_grad():
                t_logits = teacher(ids).logits
            s_logits = student(ids).logits
            kl = kl_teacher_student(t_logits, s_logits)
            reg = downs.l1() if downs is not None else torch.zeros(())
            loss = kl + cfg.l1 * reg
            optimizer_step(loss, opt, sched, params, cfg.grad_clip)
            res.loss.append(float(loss.detach()))
            res.kl.append(float(kl.detach()))
            res.l1.append(float(reg.detach()))
            res.tokens += ids.numel()
            report_step(bar, progress, step, {"kl": res.kl[-1], "l1": res.l1[-1]})
            if cfg.max_seconds and time.perf_counter() - t1 > cfg.max_seconds:
                break
    finally:
        if downs is not None:
            downs.remove()
        if bar is not None:
            bar.close()
        student.eval()
    res.seconds = time.perf_counter() - t1
    return res


def warmup_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over a tenth of the steps (at most 20), then the optimizer's rate."""
    warmup = max(1, min(steps // 10, 20))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def shuffled_batches(sequences: torch.Tensor, batch_size: int, steps: int, seed: int):
    """``steps`` batches of ``batch_size`` sequences, reshuffled (seeded) each time they run out."""
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(sequences), generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(sequences), generator=gen), 0
        yield sequences[order[pos:pos + batch_size]]
        pos += batch_size


def optimizer_step(loss: torch.Tensor, opt, sched, params, grad_clip: float) -> None:
    """Backward, clip the gradients' norm, step the optimizer and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


def report_step(bar, progress, step: int, values: dict[str, float]) -> None:
    """Show a step's figures on the progress bar, or pass them to a ``progress`` callback."""
    if bar is not None:
        bar.set_postfix(values)
        bar.update(1)
    elif callable(progress):
        progress(step, values)


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="distill", unit="step")
