"""``actsparse.quantize`` on a tiny Llama: which linears change, the dense forward, option errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actsparse
from actsparse.models import tiny
from actsparse.quant import QuantLinear, quantizable_linears


def _model(**kw):
    return tiny("llama", intermediate_size=96, **kw)


@pytest.mark.parametrize("bits,gs", [(8, None), (8, 32), (4, 32), (4, None)])
def test_quantize_replaces_decoder_linears(bits, gs):
    model = _model()
    names = set(quantizable_linears(model))
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    assert actsparse.quantize(model, bits=bits, group_size=gs) is model
    mods = dict(model.named_modules())
    assert names and all(isinstance(mods[n], QuantLinear) for n in names)
    assert not isinstance(model.get_output_embeddings(), QuantLinear)
    assert all(mods[n].bits == bits for n in names)
    if gs is not None or bits == 4:
        assert all(mods[n].group_size == 32 for n in names)  # 64 and 96 wide inputs: 32 divides both
    with torch.no_grad():
        out = model(ids).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (0.02 if bits == 8 else 0.25), rel
    # a QuantLinear is an nn.Linear with the original weight's shape (dequantised on access)
    q = mods["model.layers.0.mlp.down_proj"]
    assert isinstance(q, nn.Linear) and q.weight.shape == (64, 96) == q.weight_shape


def test_quantized_linear_matches_its_dequantised_weight():
    model = _model(attention_bias=True)
    actsparse.quantize(model, bits=4, group_size=32)
    lin = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    assert lin.bias is not None
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_options_are_validated():
    with pytest.raises(ValueError, match="bits must be"):
        actsparse.quantize(_model(), bits=2)
    with pytest.raises(ValueError, match="does not divide"):
        actsparse.quantize(_model(), bits=8, group_size=64)  # grouped int8: the same divisibility
    with pytest.raises(ValueError, match="does not divide"):
        actsparse.quantize(_model(), bits=4, group_size=64)  # the MLP's 96-wide down input
    with pytest.raises(TypeError, match="nn.Module"):
        actsparse.quantize("model", bits=8)
    with pytest.raises(ValueError, match="no nn.Linear"):
        actsparse.quantize(nn.Sequential(nn.ReLU()), bits=8)


def test_quantize_twice_keeps_layers():
    model = actsparse.quantize(_model(), bits=8)
    with pytest.raises(ValueError, match="no nn.Linear"):
        actsparse.quantize(model, bits=8)


def test_clip_search_weighted_by_activations():
    """clip="mse" with tokens: every quantized linear keeps the same storage form, the hooks are
    gone afterwards, and the model's logits are no further from the float model's than with
    each group's full range on the tokens it was fitted on."""
    base = _model()
    ids = torch.randint(3, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    full = actsparse.quantize(_model(), bits=4, group_size=32)
    fit = actsparse.quantize(_model(), bits=4, group_size=32, clip="mse", tokens=ids)
    assert all(not m._forward_pre_hooks for m in fit.modules())
    lin = fit.model.layers[0].mlp.down_proj
    assert isinstance(lin, QuantLinear) and lin.bits == 4 and lin.group_size == 32
    with torch.no_grad():
        err_full = float((full(ids).logits - ref).norm())
        err_fit = float((fit(ids).logits - ref).norm())
    assert err_fit < err_full


def test_clip_options_are_validated():
    with pytest.raises(ValueError, match="clip must be one of"):
        actsparse.quantize(_model(), bits=4, clip="max")
    ids = torch.randint(3, 100, (1, 8))
    with pytest.raises(ValueError, match="tokens= weights int4's clip search"):
        actsparse.quantize(_model(), bits=8, clip="mse", tokens=ids)
    with pytest.raises(ValueError, match="tokens= weights int4's clip search"):
        actsparse.quantize(_model(), bits=4, tokens=ids)
