"""Compile-time choice of the masked dense matmul for sites whose rows the sparse path cannot help."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.models import tiny
from actsparse.ops.dense import masked_gated_mlp, masked_input
from actsparse.ops.dispatch import sparse_pays
from actsparse.passes.pipeline import run_passes
from tests.masking import linear_names

OPS = {torch.ops.actsparse.sparse_linear.default, torch.ops.actsparse.gated_mlp.default,
       torch.ops.actsparse.channel_sparse_linear.default}


def dense_is_better(*args, **kwargs) -> bool:
    return not sparse_pays(*args, **kwargs)


def test_decision_by_device_rows_and_sparsity():
    # CPU: the op's row limit (native kernel for decode, dense for prefill)
    assert not dense_is_better("cpu", 1, 576, [1536], 0.5, 4)
    assert dense_is_better("cpu", 64, 576, [1536], 0.5, 4)
    # CUDA, Llama-3-8B gate/up: one row at 50% pays; 16 independent rows cover every channel
    assert not dense_is_better("cuda", 1, 4096, [14336, 14336], 0.5, 2)
    assert dense_is_better("cuda", 16, 4096, [14336, 14336], 0.5, 2)
    assert dense_is_better("cuda", 4, 4096, [14336, 14336], 0.0, 2)
    assert dense_is_better("cuda", 512, 4096, [14336], 0.9, 2)  # prefill
    # at very high sparsity a small batch still pays
    assert not dense_is_better("cuda", 2, 14336, [4096], 0.9, 2)
    # CATS MLP
    assert not dense_is_better("cuda", 1, 4096, [14336], 0.5, 2, gated=True)
    assert dense_is_better("cuda", 32, 4096, [14336], 0.5, 2, gated=True)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), k=st.integers(1, 9), t=st.sampled_from([0.0, 0.3, 1.0, 1e9]),
       per_token=st.booleans())
def test_masked_input_matches_reference_mask(rows, k, t, per_token):
    from actsparse.ops.reference import input_mask

    x = torch.randn(rows, k)
    got = masked_input(x, t, per_token)
    keep = input_mask(x, t, per_token)
    assert torch.equal(got, torch.where(keep, x, torch.zeros(())))


def test_masked_gated_mlp_matches_op_reference():
    from actsparse.ops.reference import gated_mlp_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    wg, wu, wd = (torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g))
    got = masked_gated_mlp(x, wg, wu, wd, None, None, None, "silu", 0.3)
    ref = gated_mlp_reference(x, wg, wu, wd, None, None, None, "silu", 0.3)
    torch.testing.assert_close(got, ref)


def _graph_targets(model, plan, rows: int):
    found = []

    def be(gm, example_inputs):
        run_passes(gm, plan)
        found.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model.forward, backend=be)(input_ids=torch.randint(1, 50, (1, rows)))
    return found


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=st.sampled_from(["llama", "gpt2", "phi3"]), cats=st.booleans())
def test_prefill_graph_has_no_sparse_op_decode_graph_has(arch, cats):
    model = tiny(arch, num_hidden_layers=1)
    if cats and arch == "llama":
        down = "model.layers.0.mlp.down_proj"
        plan = actsparse.SparsityPlan.from_thresholds(model, {}, activation_thresholds={down: 0.1}, method="cats")
    else:
        plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.1 for n in linear_names(model)})
    prefill = _graph_targets(model, plan, 12)
    decode = _graph_targets(model, plan, 1)
    assert not OPS & set(prefill)
    assert masked_input in prefill or masked_gated_mlp in prefill
    assert OPS & set(decode)


def test_dense_rows_reported_in_debug_table(capsys):
    model = tiny("llama", num_hidden_layers=1)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.1 for n in linear_names(model)})
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="sparse", options={"plan": plan, "debug": True, "compiler": "eager"})
    fn(input_ids=torch.randint(1, 50, (1, 9)))
    assert "(dense, 9 rows)" in capsys.readouterr().out


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
