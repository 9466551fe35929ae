"""LoRA adapters: start as the identity, merge exactly, round-trip through safetensors and
rebuild the same logits on a relufied model."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.models import tiny
from actsparse.train import add_lora, load_adapters, lora_modules, merge_lora, read_adapters, rebuild, save_adapters

IDS = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lo in lora_modules(model).values():
            lo.B.copy_(torch.randn(lo.B.shape, generator=g) * 0.1)


def test_new_adapters_change_nothing_and_only_they_train():
    model = tiny("llama", num_hidden_layers=2)
    before = logits(model)
    names = add_lora(model, ["q_proj", "down_proj"], rank=4)
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    torch.testing.assert_close(logits(model), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith((".A", ".B")) for n in trainable)


def test_merge_gives_plain_linears_with_the_same_function():
    model = tiny("llama", num_hidden_layers=1)
    add_lora(model, rank=2)
    randomise(model)
    want = logits(model)
    merge_lora(model)
    assert not lora_modules(model)
    assert "model.layers.0.mlp.up_proj.weight" in dict(model.named_parameters())
    torch.testing.assert_close(logits(model), want)


@pytest.mark.parametrize("variant", ["relu", "drelu", "shifted-relu", "relu-gate"])
def test_adapters_round_trip_and_rebuild_the_same_logits(tmp_path, variant):
    kw = {"shift": [0.1, 0.2]} if variant == "shifted-relu" else {}
    model, plan = actsparse.relufy(tiny("llama", num_hidden_layers=2), variant, **kw)
    add_lora(model, ["gate_proj", "up_proj", "down_proj", "o_proj"], rank=3, alpha=6.0)
    randomise(model)
    want = logits(model)
    path = tmp_path / "a.safetensors"
    save_adapters(model, path, info=plan.info)
    tensors, meta = read_adapters(path)
    assert meta["rank"] == 3 and meta["alpha"] == 6.0 and meta["variant"] == variant
    assert len(tensors) == 2 * 4 * 2
    again, plan2 = rebuild(tiny("llama", num_hidden_layers=2), path)
    assert plan2 == plan and not lora_modules(again)
    torch.testing.assert_close(logits(again), want)


def test_bad_arguments_and_mismatched_files(tmp_path):
    model = tiny("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        add_lora(model, rank=0)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        add_lora(model, alpha=-1)
    with pytest.raises(ValueError, match="non-empty list"):
        add_lora(model, targets="q_proj")
    with pytest.raises(ValueError, match="no linear of the model"):
        add_lora(model, targets=["fc9"])
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapters(model, tmp_path / "x.safetensors")
    add_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(model, ["q_proj"])
    save_adapters(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_adapters(tiny("llama", num_hidden_layers=2), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="shape"):
        load_adapters(tiny("llama", num_hidden_layers=1, hidden_size=32), tmp_path / "a.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an actsparse adapter file"):
        read_adapters(tmp_path / "plain.safetensors")
