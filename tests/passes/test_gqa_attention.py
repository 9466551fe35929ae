"""SDPA on the cache per KV head: the rewrite drops Hugging Face's repeat_kv copies and leaves
the logits as they were, with or without sparsity rules, and can be turned off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.compiler.options import OptionsError
from actsparse.models import tiny
from actsparse.plan import SparsityPlan
from tests.masking import assert_close_outputs, linear_names, masked, prefill_decode, token_inputs

GQA_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3", "phi3")


class Recording:
    """The sparse backend (eager compiler), keeping what each graph holds after the passes."""

    def __init__(self, plan, gqa: bool = True):
        self.be = actsparse.backend(plan, compiler="eager", gqa_attention=gqa)
        self.sdpa_gqa: list[bool] = []
        self.expands = 0

    def __call__(self, gm, example_inputs):
        compiled = self.be(gm, example_inputs)
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in (F.scaled_dot_product_attention,
                                                          torch._C._nn.scaled_dot_product_attention):
                self.sdpa_gqa.append(bool(n.kwargs.get("enable_gqa", False)))
            if n.op == "call_method" and n.target == "expand" and len(n.args) == 6:  # repeat_kv's 5-D expand
                self.expands += 1
        return compiled


def _run(model, plan, ids, dec, gqa=True):
    torch._dynamo.reset()
    rec = Recording(plan, gqa)
    try:
        return prefill_decode(torch.compile(model.forward, backend=rec), model, ids, dec), rec
    finally:
        torch._dynamo.reset()


def _teal_plan(model, threshold: float) -> SparsityPlan:
    return SparsityPlan(thresholds={n: threshold for n in linear_names(model)}, target=0.5)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(arch=st.sampled_from(GQA_ARCHS), kv=st.sampled_from([1, 2]), batch=st.integers(1, 2),
       seq=st.integers(1, 4), masked_plan=st.booleans(), seed=st.integers(0, 50))
def test_gqa_rewrite_matches_the_traced_model(arch, kv, batch, seq, masked_plan, seed):
    model = tiny(arch, num_hidden_layers=2, num_key_value_heads=kv, seed=seed)
    plan = _teal_plan(model, 0.3) if masked_plan else SparsityPlan()
    ids, dec = token_inputs(batch, seq, 2, seed=seed)
    got, rec = _run(model, plan, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    assert_close_outputs(got, ref)
    assert rec.sdpa_gqa and all(rec.sdpa_gqa), rec.sdpa_gqa  # every SDPA call reads the cache as it is
    assert rec.expands == 0  # no repeat_kv copy left


def test_off_keeps_the_copies_and_the_same_logits():
    model = tiny("llama", num_hidden_layers=2)
    ids, dec = token_inputs(2, 3, 2)
    on, rec_on = _run(model, SparsityPlan(), ids, dec, gqa=True)
    off, rec_off = _run(model, SparsityPlan(), ids, dec, gqa=False)
    assert all(rec_on.sdpa_gqa) and not all(rec_off.sdpa_gqa)  # HF itself uses GQA when there is no mask
    assert rec_off.expands > 0
    assert_close_outputs(on, off)


def test_without_gqa_nothing_changes():
    model = tiny("gpt2", num_hidden_layers=2)  # no KV groups: no repeat_kv to drop
    ids, dec = token_inputs(1, 3, 1)
    _, rec = _run(model, SparsityPlan(), ids, dec)
    assert not any(rec.sdpa_gqa)


def test_inductor_compiles_the_rewrite():
    model = tiny("llama", num_hidden_layers=1)
    ids, dec = token_inputs(1, 4, 2)
    torch._dynamo.reset()
    try:
        got = prefill_decode(torch.compile(model.forward, backend=actsparse.backend(SparsityPlan())), model, ids, dec)
    finally:
        torch._dynamo.reset()
    ref = prefill_decode(model.forward, model, ids, dec)
    assert_close_outputs(got, ref)


def test_option_is_validated():
    with pytest.raises(OptionsError, match="gqa_attention"):
        actsparse.backend(SparsityPlan(), gqa_attention="yes")
