"""Quantized weights saved and loaded (``actsparse.quant.files``): the loaded model is the saved
one, bit for bit; wrong files fail before anything is replaced."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import actsparse
from actsparse.models import tiny
from actsparse.quant import QuantLinear, load_quantized, save_quantized
from actsparse.quant.storage import quantize_int8


def _mixed(arch: str = "qwen2", **kw) -> torch.nn.Module:
    """Every stored format in one model: int4 g32 everywhere, one int8 per-channel linear, one
    int8 g32, one int8 g16 (GGUF Q6_K's), and a quantized output head."""
    model = actsparse.quantize(tiny(arch, intermediate_size=96, **kw), bits=4, group_size=32)
    base = tiny(arch, intermediate_size=96, **kw)
    layer = "model.layers.1."
    swaps = {layer + "self_attn.o_proj": QuantLinear.from_linear(base.get_submodule(layer + "self_attn.o_proj"), 8),
             layer + "mlp.up_proj": QuantLinear.from_linear(base.get_submodule(layer + "mlp.up_proj"), 8, 32),
             layer + "mlp.down_proj": QuantLinear(quantize_int8(base.get_submodule(layer + "mlp.down_proj").weight, 16),
                                                  None),
             "lm_head": QuantLinear.from_linear(base.lm_head, 8, 32)}
    for name, layer_ in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer_)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_is_exact(tmp_path):
    model = _mixed()
    path = save_quantized(model, tmp_path / "m.safetensors", info={"rounding": "nearest"})
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_quantized(tiny("qwen2", intermediate_size=96), path)  # the float model it came from
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    mods = dict(loaded.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            got = mods[name]
            assert isinstance(got, QuantLinear) and (got.bits, got.group_size) == (m.bits, m.group_size)
            assert (got.bias is None) == (m.bias is None)  # qwen2's q/k/v carry biases
    assert any(m.bias is not None for m in mods.values() if isinstance(m, QuantLinear))
    ids = torch.randint(3, 100, (2, 7))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    actsparse.SparsityPlan.from_thresholds(tiny("qwen2", intermediate_size=96), {}).validate(loaded)


def test_scales_take_the_model_dtype(tmp_path):
    """Saved from fp32, loaded into the bf16 model: the fp32 quantized model cast to bf16."""
    saved = actsparse.quantize(tiny("llama", intermediate_size=96), bits=4, group_size=32)
    path = save_quantized(saved, tmp_path / "m.safetensors")
    loaded = load_quantized(tiny("llama", intermediate_size=96, dtype=torch.bfloat16), path)
    lin = loaded.model.layers[0].mlp.down_proj
    assert lin.scales.dtype == lin.offsets.dtype == torch.bfloat16 and lin.qweight.dtype == torch.uint8
    ids = torch.randint(3, 100, (1, 5))
    assert torch.equal(_logits(loaded, ids), _logits(saved.to(torch.bfloat16), ids))


def test_tied_head_is_untied_on_load(tmp_path):
    model = tiny("llama", intermediate_size=96, tie_word_embeddings=True)
    model.lm_head = QuantLinear.from_linear(model.lm_head, 8, 32)
    model.config.tie_word_embeddings = False
    path = save_quantized(model, tmp_path / "head.safetensors")
    fresh = tiny("llama", intermediate_size=96, tie_word_embeddings=True)
    loaded = load_quantized(fresh, path)
    assert isinstance(loaded.lm_head, QuantLinear) and not loaded.config.tie_word_embeddings
    ids = torch.randint(3, 100, (1, 5))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_wrong_files_fail_before_anything_is_replaced(tmp_path):
    model = _mixed()
    path = save_quantized(model, tmp_path / "m.safetensors")

    def untouched(m):
        return not any(isinstance(x, QuantLinear) for x in m.modules())

    other = tiny("qwen2", intermediate_size=128)
    with pytest.raises(ValueError, match="another model's weights"):
        load_quantized(other, path)
    assert untouched(other)
    with pytest.raises(ValueError, match="another model's weights"):
        load_quantized(tiny("llama", intermediate_size=96), path)

    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    bad = dict(tensors)
    bad["lm_head.scales"] = bad["lm_head.scales"][:-1]  # the last module replaced, if it got that far
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    fresh = tiny("qwen2", intermediate_size=96)
    with pytest.raises(ValueError, match=r"lm_head.scales is shape .*, its format needs"):
        load_quantized(fresh, tmp_path / "bad.safetensors")
    assert untouched(fresh)
    del bad["lm_head.scales"]
    save_file(bad, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="lm_head.scales is missing"):
        load_quantized(tiny("qwen2", intermediate_size=96), tmp_path / "missing.safetensors")

    header = json.loads(meta["actsparse"])
    header["version"] = 99
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={"actsparse": json.dumps(header)})
    with pytest.raises(ValueError, match="version 99"):
        load_quantized(tiny("qwen2", intermediate_size=96), tmp_path / "future.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an actsparse quantized-weights file"):
        load_quantized(tiny("qwen2", intermediate_size=96), tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_quantized(tiny("qwen2", intermediate_size=96), tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_quantized(tiny("qwen2", intermediate_size=96), tmp_path / "absent.safetensors")


def test_save_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="no quantized linears"):
        save_quantized(tiny("llama", intermediate_size=96), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_quantized(_mixed(), tmp_path / "x.safetensors", info={"plan": object()})
    assert not list(tmp_path.iterdir())
