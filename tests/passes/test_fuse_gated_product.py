"""The gated product folded into the gate/up call: compiled equals the eager model masked by
hooks, every gated MLP with masked gate and up is fused, anything else is left alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.compiler.options import OptionsError
from actsparse.models import tiny
from actsparse.ops.sparse_gated_product import sparse_gated_product
from actsparse.ops.sparse_linear import sparse_linear
from actsparse.plan import SparsityPlan
from tests.masking import assert_close_outputs, linear_names, masked, prefill_decode, token_inputs

GATED = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3")


class Counting:
    def __init__(self, plan, fuse=True):  # True: fused on the CPU too ("auto" fuses CUDA weights only)
        self.be = actsparse.backend(plan, compiler="eager", fuse_gated_product=fuse)
        self.fused = self.linear = 0

    def __call__(self, gm, example_inputs):
        compiled = self.be(gm, example_inputs)
        for n in gm.graph.nodes:
            self.fused += n.op == "call_function" and n.target == sparse_gated_product
            self.linear += n.op == "call_function" and n.target == sparse_linear
        return compiled


def _run(model, plan, ids, dec, fuse=True):
    torch._dynamo.reset()
    be = Counting(plan, fuse)
    try:
        return prefill_decode(torch.compile(model.forward, backend=be), model, ids, dec), be
    finally:
        torch._dynamo.reset()


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(arch=st.sampled_from(GATED), batch=st.integers(1, 2), seq=st.integers(1, 4), seed=st.integers(0, 50),
       t_gate=st.floats(0.05, 1.0), t_up=st.floats(0.05, 1.0))
def test_fused_model_matches_hook_reference(arch, batch, seq, seed, t_gate, t_up):
    model = tiny(arch, num_hidden_layers=2, seed=seed)
    th = {n: (t_gate if n.endswith("gate_proj") else t_up if n.endswith("up_proj") else 0.3)
          for n in linear_names(model)}
    plan = SparsityPlan(thresholds=th, target=0.5)
    ids, dec = token_inputs(batch, seq, 2, seed=seed)
    got, be = _run(model, plan, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    assert_close_outputs(got, ref)
    assert be.fused >= 2  # both layers' MLPs in the decode graph


def test_gate_alone_is_not_fused():
    model = tiny("llama", num_hidden_layers=2)
    plan = SparsityPlan(thresholds={n: 0.3 for n in linear_names(model) if not n.endswith("up_proj")}, target=0.5)
    ids, dec = token_inputs(1, 3, 2)
    got, be = _run(model, plan, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    assert_close_outputs(got, ref)
    assert be.fused == 0 and be.linear > 0


def test_plain_mlp_is_left_alone():
    model = tiny("gpt2", num_hidden_layers=2)  # no gate: nothing to fuse
    plan = SparsityPlan(thresholds={n: 0.3 for n in linear_names(model)}, target=0.5)
    _, be = _run(model, plan, *token_inputs(1, 3, 1))
    assert be.fused == 0 and be.linear > 0


def test_off_switch_keeps_the_product_outside():
    model = tiny("llama", num_hidden_layers=2)
    plan = SparsityPlan(thresholds={n: 0.3 for n in linear_names(model)}, target=0.5)
    ids, dec = token_inputs(1, 3, 2)
    torch._dynamo.reset()
    be = Counting(plan)
    be.be = actsparse.backend(plan, compiler="eager", fuse_gated_product=False)
    try:
        off = prefill_decode(torch.compile(model.forward, backend=be), model, ids, dec)
    finally:
        torch._dynamo.reset()
    on, _ = _run(model, plan, ids, dec)
    assert be.fused == 0 and be.linear > 0
    assert_close_outputs(on, off)


def test_auto_fuses_cuda_weights_only():
    """The default leaves CPU graphs to Inductor's fused product (no launch to save there)."""
    model = tiny("llama", num_hidden_layers=2)
    plan = SparsityPlan(thresholds={n: 0.3 for n in linear_names(model)}, target=0.5)
    ids, dec = token_inputs(1, 3, 2)
    auto, be = _run(model, plan, ids, dec, fuse="auto")
    assert be.fused == 0 and be.linear > 0
    on, be_on = _run(model, plan, ids, dec)
    assert be_on.fused >= 2
    assert_close_outputs(auto, on)


@pytest.mark.parametrize("bad", ["yes", "on", 1])
def test_bad_option_value_is_refused(bad):
    with pytest.raises(OptionsError, match="fuse_gated_product"):
        actsparse.backend(SparsityPlan(), fuse_gated_product=bad)
