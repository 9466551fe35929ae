"""GGUF blocks kept quantized: Q8_0 / Q4_1 read into our storage equal gguf's own dequantisation;
on SmolLM2-135M (slow, needs the offline package) ``keep_quantized`` gives the dequantised
model's logits and its compiled sparse decode equals the masked eager model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

import actsparse  # noqa: E402
from actsparse.models import ModelNotInstalledError, load  # noqa: E402
from actsparse.quant.gguf import (_rotary_order, read_q4_1, read_q4_k, read_q5_0, read_q6_k,  # noqa: E402
                                  read_q8_0)
from actsparse.quant.linear import QuantLinear  # noqa: E402
from tests.masking import linear_names, masked, prefill_decode  # noqa: E402


#: Byte offsets of each block type's fp16 fields (scales, minimums): random bytes there could be
#: NaN or infinite.
FP16_AT = {"Q8_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}
READ = {"Q8_0": read_q8_0, "Q5_0": read_q5_0, "Q4_1": read_q4_1, "Q4_K": read_q4_k, "Q6_K": read_q6_k}
#: (bits, group size) each block type becomes.
FORMAT = {"Q8_0": (8, 32), "Q5_0": (8, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q6_K": (8, 16)}


def _random_blocks(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """Valid blocks: random payload bytes, finite fp16 scales (and minimums)."""
    t = GGMLQuantizationType[qtype]
    elems, size = GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // elems, size), dtype=np.uint8)
    for at in FP16_AT[qtype]:
        raw[..., at:at + 2] = (rng.standard_normal((n, k // elems)) * 0.01).astype(np.float16)[..., None] \
            .view(np.uint8).reshape(n, k // elems, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype", list(READ))
@pytest.mark.parametrize("n,k", [(6, 256), (48, 768)])
def test_blocks_equal_gguf_dequantisation(qtype, n, k):
    """Every block type against gguf's own dequantisation, bit for bit."""
    data = _random_blocks(qtype, n, k, seed=n + k)
    qw = READ[qtype](data, n, k)
    ref = torch.from_numpy(dequantize(data, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32))
    assert torch.equal(qw.dequantize(), ref)
    assert (qw.bits, qw.group_size) == FORMAT[qtype] and (qw.out_features, qw.in_features) == (n, k)


def test_block_readers_reject_shapes_they_cannot_hold():
    with pytest.raises(ValueError, match="multiple of the block's 256"):
        read_q4_k(_random_blocks("Q4_K", 4, 256, 0), 4, 128)
    with pytest.raises(ValueError, match="two outputs per byte"):
        read_q4_k(_random_blocks("Q4_K", 3, 256, 0), 3, 256)


def test_rotary_order_is_a_permutation():
    order = _rotary_order(24, 3)
    assert sorted(order.tolist()) == list(range(24)) and order[:4].tolist() == [0, 2, 4, 6]


def _dense_and_kept(name: str):
    """(dequantised model, the same kept quantized, tokenizer), or a skip if it is not installed."""
    try:
        dense, tok = load(name)
        quant, _ = load(name, keep_quantized=True)
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    return dense, quant, tok


@pytest.fixture(scope="module")
def smollm2():
    return _dense_and_kept("smollm2-135m")


@pytest.mark.slow
def test_keep_quantized_matches_dequantised_model(smollm2):
    dense, quant, tok = smollm2
    mods = dict(quant.named_modules())
    assert all(isinstance(mods[n], QuantLinear) for n in linear_names(quant))
    assert mods["model.layers.0.mlp.down_proj"].bits == 4  # the file's Q4_1
    assert isinstance(quant.lm_head, QuantLinear) and quant.lm_head.bits == 8  # Q8_0, group 32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = dense(ids).logits, quant(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    actsparse.SparsityPlan.from_thresholds(dense, {}).validate(quant)  # plans made on the dense model apply


def _sparse_against_masked(model, plan, ids, dec):
    """(compiled sparse steps' logits, masked eager ones, quantized sparse ops per graph)."""
    torch._dynamo.reset()
    qsl = torch.ops.actsparse.quant_sparse_linear.default
    be = actsparse.backend(plan, compiler="eager")
    seen = []

    def counting(gm, example_inputs):
        out = be(gm, example_inputs)
        seen.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == qsl))
        return out

    got = prefill_decode(torch.compile(model.forward, backend=counting), model, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    return got, ref, seen


@pytest.mark.slow
def test_keep_quantized_sparse_decode_matches_masked_reference(smollm2):
    _, model, tok = smollm2
    names = linear_names(model)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.05 for n in names})
    ids = tok("Sparse decoding on quantized weights", return_tensors="pt").input_ids
    dec = torch.tensor([[11, 12, 13]])
    got, ref, seen = _sparse_against_masked(model, plan, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max().item() <= 2e-4 * y.abs().max().item() + 1e-4
    assert max(seen) >= len(names)  # the decode graph runs every masked linear on the quantized kernel


@pytest.fixture(scope="module")
def gemma3():
    return _dense_and_kept("gemma3-270m")


@pytest.mark.slow
def test_gemma3_keeps_its_q5_0_q4_k_q6_k_and_q8_0_blocks(gemma3):
    """Gemma-3's Q4_K_M file mixes four block types; every linear stays quantized, and the
    sparse decode graph runs them all on the quantized kernels against the masked reference."""
    dense, model, tok = gemma3
    mods = dict(model.named_modules())
    names = linear_names(model)
    assert all(isinstance(mods[n], QuantLinear) for n in names)
    formats = {(mods[n].bits, mods[n].group_size) for n in names}
    assert formats == {(8, 32), (4, 32), (8, 16)}  # Q5_0 / Q8_0, Q4_K, Q6_K
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = dense(ids).logits, model(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.05 for n in names})
    got, ref, seen = _sparse_against_masked(model, plan, ids, torch.tensor([[11, 12]]))
    for x, y in zip(got, ref):
        assert (x - y).abs().max().item() <= 2e-4 * y.abs().max().item() + 1e-4
    assert max(seen) >= len(names)  # every masked linear, each format, on the quantized kernel


@pytest.mark.slow
def test_unsupported_block_types_are_named(monkeypatch):
    from actsparse.quant import gguf as gguf_weights

    monkeypatch.setattr(gguf_weights, "KEPT", ("Q8_0",))  # as if Q4_1 had no reader
    try:
        load("smollm2-135m", keep_quantized=True)
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    except ValueError as e:
        assert "Q4_1" in str(e) and "without keep_quantized" in str(e)
    else:
        pytest.fail("a block type without a reader must be refused")
