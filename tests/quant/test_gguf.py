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
from actsparse.quant.gguf import _rotary_order, read_q4_1, read_q8_0  # noqa: E402
from actsparse.quant.linear import QuantLinear  # noqa: E402
from tests.masking import linear_names, masked, prefill_decode  # noqa: E402


def _random_blocks(qtype: str, n: int, k: int, seed: int) -> np.ndarray:
    """Valid blocks: random payload bytes, finite fp16 scales (and minimums)."""
    t = GGMLQuantizationType[qtype]
    _, size = GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // 32, size), dtype=np.uint8)
    heads = 2 if qtype == "Q4_1" else 1  # d (and m) at the front of each block
    for h in range(heads):
        raw[..., 2 * h:2 * h + 2] = (rng.standard_normal((n, k // 32)) * 0.01).astype(np.float16)[..., None] \
            .view(np.uint8).reshape(n, k // 32, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("qtype,reader", [("Q8_0", read_q8_0), ("Q4_1", read_q4_1)])
@pytest.mark.parametrize("n,k", [(6, 32), (48, 96)])
def test_blocks_equal_gguf_dequantisation(qtype, reader, n, k):
    data = _random_blocks(qtype, n, k, seed=n + k)
    qw = reader(data, n, k)
    ref = torch.from_numpy(dequantize(data, GGMLQuantizationType[qtype]).reshape(n, k).astype(np.float32))
    torch.testing.assert_close(qw.dequantize(), ref, rtol=1e-6, atol=1e-7)
    assert qw.group_size == 32 and qw.bits == (8 if qtype == "Q8_0" else 4)


def test_rotary_order_is_a_permutation():
    order = _rotary_order(24, 3)
    assert sorted(order.tolist()) == list(range(24)) and order[:4].tolist() == [0, 2, 4, 6]


@pytest.fixture(scope="module")
def smollm2():
    try:
        dense, tok = load("smollm2-135m")
        quant, _ = load("smollm2-135m", keep_quantized=True)
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    return dense, quant, tok


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


@pytest.mark.slow
def test_keep_quantized_sparse_decode_matches_masked_reference(smollm2):
    _, model, tok = smollm2
    names = linear_names(model)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.05 for n in names})
    ids = tok("Sparse decoding on quantized weights", return_tensors="pt").input_ids
    dec = torch.tensor([[11, 12, 13]])
    torch._dynamo.reset()
    qsl = torch.ops.actsparse.quant_sparse_linear.default
    seen = []

    def counting(gm, example_inputs):
        out = be(gm, example_inputs)
        seen.append(sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == qsl))
        return out

    be = actsparse.backend(plan, compiler="eager")
    got = prefill_decode(torch.compile(model.forward, backend=counting), model, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max().item() <= 2e-4 * y.abs().max().item() + 1e-4
    assert max(seen) >= len(names)  # the decode graph runs every masked linear on the quantized kernel


@pytest.mark.slow
def test_unsupported_block_types_are_named():
    try:
        load("gemma3-270m", keep_quantized=True)
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    except ValueError as e:
        assert "Q4_K" in str(e) and "Q5_0" in str(e) and "without keep_quantized" in str(e)
    else:
        pytest.fail("gemma3-270m's Q4_K / Q5_0 / Q6_K linears cannot be kept quantized")
