"""CPU graphs send the quantized linears no plan masks to the native kernel (``quant_dense_cpu``):
the compiled model equals the eager quantized model, and no ``quant_linear`` is left to Inductor."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.models import tiny
from actsparse.quant import QuantLinear
from tests.masking import linear_names, masked, prefill_decode

QL = torch.ops.actsparse.quant_linear.default
QSL = torch.ops.actsparse.quant_sparse_linear.default


class Recording:
    """The sparse backend, recording the ops of the graphs it hands on."""

    def __init__(self, plan, compiler):
        self.be = actsparse.backend(plan, compiler=compiler)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        compiled = self.be(gm, example_inputs)
        self.graphs.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return compiled


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32)])
@pytest.mark.parametrize("masked_names", ["none", "mlp"])
def test_unmasked_quantized_linears_run_the_native_kernel(bits, group, compiler, masked_names):
    model = tiny("llama", intermediate_size=96)
    names = linear_names(model)
    chosen = [] if masked_names == "none" else [n for n in names if ".mlp." in n]
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in chosen})
    actsparse.quantize(model, bits=bits, group_size=group)
    model.lm_head = QuantLinear.from_linear(model.lm_head, 8, 32)  # a quantized head, as GGUF's Q8_0
    model.config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(1, 128, (1, 5), generator=g), torch.randint(1, 128, (1, 3), generator=g)
    be = Recording(plan, compiler)
    torch._dynamo.reset()
    got = prefill_decode(torch.compile(model.forward, backend=be), model, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max().item() <= 2e-4 * y.abs().max().item() + 1e-5
    # every linear and the head is one quantized op; the prefill graph's masked sites may keep
    # their masked dense form (5 static rows: sparse cannot pay), the decode graph has none left
    assert len(be.graphs) == 2 and all(g.count(QSL) + g.count(QL) == len(names) + 1 for g in be.graphs)
    assert be.graphs[-1].count(QSL) == len(names) + 1
    assert be.graphs[0].count(QL) == len(chosen)
