"""Self-distillation at tiny scale: seeded teacher samples, the KL falls over a few steps."""

from __future__ import annotations

import copy

import pytest
import torch

import actsparse
from actsparse.models import tiny
from actsparse.train import DistillConfig, distill, held_out_kl, kl_teacher_student, lora_modules, mlp_sparsity, sample_sequences


def test_samples_are_seeded_and_full_length():
    teacher = tiny("llama", num_hidden_layers=1)
    a = sample_sequences(teacher, 3, 7, seed=5, batch=2)
    b = sample_sequences(teacher, 3, 7, seed=5, batch=2)
    assert a.shape == (3, 7) and torch.equal(a, b)
    assert not torch.equal(a, sample_sequences(teacher, 3, 7, seed=6, batch=2))


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    x = torch.randn(2, 3, 11)
    assert kl_teacher_student(x, x).abs() < 1e-6
    assert kl_teacher_student(x, torch.randn(2, 3, 11)) > 0


@pytest.mark.parametrize("l1", [0.0, 0.05])
def test_kl_falls_over_a_few_steps(l1):
    teacher = tiny("llama", num_hidden_layers=2)
    student, _ = actsparse.relufy(copy.deepcopy(teacher), "relu")
    seen = []
    seqs = sample_sequences(teacher, 8, 12, seed=0)
    before = held_out_kl(student, teacher, seqs)
    cfg = DistillConfig(steps=12, batch_size=4, seq_len=12, lr=5e-3, rank=4, l1=l1, seed=0)
    res = distill(student, teacher, cfg, sequences=seqs, progress=lambda step, v: seen.append(step))
    assert seen == list(range(12)) and len(res.kl) == 12 and res.tokens == 12 * 4 * 12
    after = held_out_kl(student, teacher, seqs)
    assert after < 0.7 * before, (before, after, res.kl)
    assert (min(res.l1) > 0) == (l1 > 0)
    assert lora_modules(student) and not any(p.requires_grad for n, p in teacher.named_parameters())
    assert all(0 < v < 1 for v in mlp_sparsity(student, torch.tensor([[1, 2, 3, 4]])).values())


@pytest.mark.parametrize("field, value, msg", [("steps", 0, "steps must be"), ("seq_len", 1, "seq_len must be"),
                                               ("lr", 0.0, "lr must be"), ("l1", -1.0, "l1 must be"),
                                               ("top_k", -1, "top_k"), ("batch_size", True, "batch_size")])
def test_bad_config_is_a_clear_error(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        DistillConfig(**{field: value}).check()


def test_time_budget_stops_early():
    teacher = tiny("llama", num_hidden_layers=1)
    student, _ = actsparse.relufy(copy.deepcopy(teacher), "relu")
    res = distill(student, teacher, DistillConfig(steps=50, batch_size=2, seq_len=8, samples=4, max_seconds=1e-9))
    assert len(res.kl) == 1
