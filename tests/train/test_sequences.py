"""The teacher-sample cache: written on the first call, read back (no sampling) when the
shapes match, sampled again when they do not."""

from __future__ import annotations

import torch

from actsparse.models import tiny
from actsparse.train.sequences import cached_sequences


def test_cache_round_trip_and_shape_change(tmp_path):
    model, path = tiny("llama"), tmp_path / "seqs.safetensors"
    train, held, secs = cached_sequences(model, 3, 2, 6, path, seed=1, batch=4)
    assert train.shape == (3, 6) and held.shape == (2, 6) and secs > 0 and path.is_file()
    again, held2, secs2 = cached_sequences(model, 3, 2, 6, path, seed=1)
    assert secs2 == 0.0 and torch.equal(again, train) and torch.equal(held2, held)
    longer, _, secs3 = cached_sequences(model, 3, 2, 8, path, seed=1)
    assert longer.shape == (3, 8) and secs3 > 0
    assert cached_sequences(model, 3, 2, 8, path, seed=1)[2] == 0.0  # the new shape replaced the old


def test_without_a_path_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, held, _ = cached_sequences(tiny("llama"), 2, 1, 5, None)
    assert train.shape == (2, 5) and held.shape == (1, 5) and not list(tmp_path.iterdir())
