"""Built-in statistical top-k (Gemma 3n): recognised in the Dynamo graph, lowered sparse, exact.

A tiny random Gemma 3n text model compiled with ``backend="sparse"`` and no plan equals the
Hugging Face eager model (its zeros are zeros), and the site table says which down projections
ran the sparse op; a hand-written MLP of the same form checks the match over random sizes,
activations and target sparsities (hypothesis), and near misses that must not match.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.plan import SparsityPlan

T = pytest.importorskip("transformers")
SL = torch.ops.actsparse.sparse_linear.default
PATTERN = [0.95, 0.6, 0.0, 0.0]


def tiny_gemma3n():
    """A 4-layer random Gemma 3n text model; layers 0-1 sparse (0.95, 0.6), 2-3 dense."""
    pytest.importorskip("transformers.models.gemma3n")
    cfg = T.Gemma3nTextConfig(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        activation_sparsity_pattern=PATTERN, num_kv_shared_layers=2, laurel_rank=8, altup_num_inputs=2,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=16)
    torch.manual_seed(0)
    return T.Gemma3nForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def gemma3n():
    return tiny_gemma3n()


def _compile_run(model, ids, **opts):
    torch._dynamo.reset()
    be = actsparse.backend(compiler="eager", **opts)
    with torch.no_grad():
        out = torch.compile(model, backend=be, fullgraph=True)(ids, use_cache=False).logits
    torch._dynamo.reset()
    return be, out


def _rules(be):
    return {s.module: (s.role, s.rule) for s in be.sites}


@pytest.mark.parametrize("tokens", [1, 3])
def test_gemma3n_no_plan_equals_eager(gemma3n, tokens):
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        ref = gemma3n(ids, use_cache=False).logits
    be, out = _compile_run(gemma3n, ids, sparsity=0.0, debug=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    rules = _rules(be)
    for i, p in enumerate(PATTERN):
        role, rule = rules[f"model.layers.{i}.mlp.down_proj"]
        assert role.startswith("mlp_down")
        assert rules[f"model.layers.{i}.mlp.gate_proj"][0] == "mlp_in"
        if p > 0:
            assert rule == f"builtin gaussian-topk p={p:.3g} t=0 (exact)", rule
        else:
            assert rule == "-"
    assert be.masked_sites == 2  # the two sparse layers' down projections, nothing else


def test_gemma3n_default_plan_keeps_builtin_rule(gemma3n):
    """No options at all: statistical top-k on the other sites, the built-in rule on the down inputs."""
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="no plan given"):
        be, _ = _compile_run(gemma3n, ids)
    rules = _rules(be)
    assert rules["model.layers.0.mlp.down_proj"][1].startswith("builtin gaussian-topk p=0.95")
    assert rules["model.layers.0.mlp.gate_proj"][1].startswith("stat-topk")
    assert rules["model.layers.2.mlp.down_proj"][1].startswith("stat-topk")


def test_gemma3n_plan_rule_takes_precedence(gemma3n):
    """A plan threshold on a built-in MLP's down input replaces the t=0 rule (it skips the zeros too)."""
    ids = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(0))
    plan = SparsityPlan(thresholds={"model.layers.0.mlp.down_proj": 0.01})
    be, _ = _compile_run(gemma3n, ids, plan=plan)
    rules = _rules(be)
    assert rules["model.layers.0.mlp.down_proj"][1].startswith("teal t=0.01")
    assert rules["model.layers.1.mlp.down_proj"][1].startswith("builtin gaussian-topk")


def test_gemma3n_inductor_equals_eager(gemma3n):
    """The same through Inductor (one decode-shaped token)."""
    ids = torch.tensor([[5]])
    with torch.no_grad():
        ref = gemma3n(ids, use_cache=False).logits
        torch._dynamo.reset()
        out = torch.compile(gemma3n, backend="sparse", options={"sparsity": 0.0})(ids, use_cache=False).logits
        torch._dynamo.reset()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the match on its own

class GaussianTopKMLP(nn.Module):
    """``down(act(relu(g - mean(g) - std(g) * z)) * up(x))``, z = Phi^-1(p): Gemma 3n's form."""

    def __init__(self, d, n, p, act, cutoff="gaussian"):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, n, bias=False), nn.Linear(d, n, bias=False), nn.Linear(n, d, bias=False)
        self.p, self.act, self.cutoff = p, act, cutoff

    def forward(self, x):
        g = self.gate(x)
        z = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(self.p, dtype=torch.float32))
        mean = torch.mean(g, dim=-1, keepdim=True)
        if self.cutoff == "gaussian":
            c = mean + torch.std(g, dim=-1, keepdim=True, unbiased=False) * z.type(g.dtype)
        else:  # a near miss: no std term
            c = mean * z.type(g.dtype)
        g = F.relu(g - c)
        a = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
             "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[self.act](g)
        return self.down(a * self.up(x))


def _run(mod, x):
    torch._dynamo.reset()
    be = actsparse.backend(sparsity=0.0, compiler="eager")
    with torch.no_grad():
        out = torch.compile(mod, backend=be, fullgraph=True)(x)
    torch._dynamo.reset()
    return be, out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.integers(3, 24), n=st.integers(4, 96), p=st.floats(0.05, 0.99),
       act=st.sampled_from(["silu", "relu", "gelu", "gelu_tanh"]), rows=st.integers(1, 3), seed=st.integers(0, 99))
def test_match_random_mlps(d, n, p, act, rows, seed):
    torch.manual_seed(seed)
    mod = GaussianTopKMLP(d, n, p, act).eval()
    x = torch.randn(rows, d)
    with torch.no_grad():
        ref = mod(x)
    be, out = _run(mod, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    down = next(s for s in be.sites if s.module == "down")
    assert down.role == "mlp_down" and down.act == act
    assert down.rule.startswith("builtin gaussian-topk")
    p_found = float(down.rule.split("p=")[1].split()[0])
    assert math.isclose(p_found, p, rel_tol=2e-3, abs_tol=2e-3)


def test_near_miss_not_matched():
    mod = GaussianTopKMLP(8, 16, 0.9, "gelu_tanh", cutoff="mean-only").eval()
    x = torch.randn(1, 8)
    with torch.no_grad():
        ref = mod(x)
    be, out = _run(mod, x)
    torch.testing.assert_close(out, ref)
    assert all(s.rule == "-" for s in be.sites)
