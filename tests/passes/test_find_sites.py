"""Site discovery on its own: every linear of a Dynamo graph and the role its input plays.

The graph is captured by a recording backend and ``discover_sites`` runs inside it (Dynamo
drops the placeholders' sources once compilation is over).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actsparse.models import tiny
from actsparse.passes.find_sites import Site, discover_sites, site_table

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3", "phi3", "gpt2")
ACT = {"llama": "silu", "qwen2": "silu", "qwen3": "silu", "mistral": "silu", "gemma": "gelu_tanh",
       "gemma3": "gelu_tanh"}  # gated MLPs and their activation; phi3 (fused gate_up) and gpt2 are not gated

# per layer: role -> module name suffixes
LAYOUT = {
    "gated": {"attn_in": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "attn_out": ["self_attn.o_proj"], "mlp_in": ["mlp.gate_proj", "mlp.up_proj"],
              "mlp_down": ["mlp.down_proj"]},
    "phi3": {"attn_in": ["self_attn.qkv_proj"], "attn_out": ["self_attn.o_proj"], "mlp_in": ["mlp.gate_up_proj"],
             "mlp_down": ["mlp.down_proj"]},
    "gpt2": {"attn_in": ["attn.c_attn"], "attn_out": ["attn.c_proj"], "mlp_in": ["mlp.c_fc"],
             "mlp_down": ["mlp.c_proj"]},
}
PREFIX = {"gpt2": "transformer.h"}


def capture_sites(model: torch.nn.Module, rows: int = 3) -> list[list[Site]]:
    """``discover_sites`` on each Dynamo graph of ``model(ids)``, run inside a recording backend."""
    found: list[list[Site]] = []

    def record(gm, example_inputs):
        found.append(discover_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(
            torch.randint(1, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(0)))
    torch._dynamo.reset()
    return found


def _layout(arch):
    return LAYOUT["gated" if arch in ACT else arch]


def _check_model(arch, model, sites):
    layers = model.config.num_hidden_layers
    modules = dict(model.named_modules())
    layout = _layout(arch)
    prefix = PREFIX.get(arch, "model.layers")
    # module names are those of named_modules(), each module once, in graph order per layer
    assert all(s.module in modules for s in sites), [s.module for s in sites if s.module not in modules]
    assert len({s.module for s in sites}) == len(sites)
    by_name = {s.module: s for s in sites}
    expected = {f"{prefix}.{i}.{suffix}": role for i in range(layers)
                for role, suffixes in layout.items() for suffix in suffixes}
    got = {s.module: s.role for s in sites if s.role != "other"}
    assert got == expected, site_table(sites)
    # the LM head (tied heads show as the embedding that owns the weight) is the one "other"
    others = [s for s in sites if s.role == "other"]
    assert len(others) == 1
    head = model.get_output_embeddings()
    assert modules[others[0].module].weight is head.weight
    assert others[0].node is sites[-1].node
    for s in sites:
        assert s.kind == ("addmm" if arch == "gpt2" and s.role != "other" else "linear")
        w = modules[s.module].weight
        assert (s.out_features, s.in_features) == ((w.shape[1], w.shape[0]) if s.kind == "addmm" else tuple(w.shape))
        if s.role != "other":
            assert s.block == int(s.module[len(prefix) + 1:].split(".")[0])
    for i in range(layers):
        layer = {role: [by_name[f"{prefix}.{i}.{sfx}"] for sfx in sfxs] for role, sfxs in layout.items()}
        # q/k/v share one input, and gate/up another
        assert len({s.input for s in layer["attn_in"]}) == 1
        assert len({s.input for s in layer["mlp_in"]}) == 1
        assert layer["attn_in"][0].input is not layer["mlp_in"][0].input
        assert layer["attn_out"][0].input is not layer["attn_in"][0].input
        (down,) = layer["mlp_down"]
        if arch in ACT:
            assert down.act == ACT[arch]
            assert down.gated["gate"] is by_name[f"{prefix}.{i}.mlp.gate_proj"]
            assert down.gated["up"] is by_name[f"{prefix}.{i}.mlp.up_proj"]
        else:
            assert down.act is None and down.gated == {}
    for s in sites:
        if s.role != "mlp_down":
            assert s.act is None and s.gated == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_roles_per_layer(arch):
    model = tiny(arch, num_hidden_layers=2)
    (sites,) = capture_sites(model)
    _check_model(arch, model, sites)
    table = site_table(sites)
    assert table.splitlines()[0].split() == ["module", "role", "kind", "in", "out", "rule"]
    if arch in ACT:
        assert f"mlp_down ({ACT[arch]})" in table


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_decode_row_and_a_longer_prompt_find_the_same_sites(arch):
    model = tiny(arch, num_hidden_layers=1)
    a = [(s.module, s.role, s.act) for s in capture_sites(model, rows=1)[0]]
    b = [(s.module, s.role, s.act) for s in capture_sites(model, rows=7)[0]]
    assert a == b


def test_no_linear_no_sites():
    found = []

    def record(gm, example_inputs):
        found.append(discover_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: torch.sin(x) @ x.T, backend=record)(torch.randn(3, 3))
    assert found == [[]]


def test_linear_on_a_tensor_that_is_not_a_parameter_is_no_site():
    w = torch.randn(4, 6)
    found = []

    def record(gm, example_inputs):
        found.append(discover_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x, w: torch.nn.functional.linear(x, w), backend=record)(torch.randn(2, 6), w)
    assert found == [[]]


class TwoMLPs(torch.nn.Module):
    """A plain MLP and a gated one, outside any transformer: roles from graph shape alone."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.gate, self.up, self.down = torch.nn.Linear(8, 12), torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(x)))
        x = x + self.down(torch.nn.functional.gelu(self.gate(x)) * self.up(x))
        return self.head(x)


def test_roles_outside_transformers():
    found = []

    def record(gm, example_inputs):
        found.append(discover_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(TwoMLPs(), backend=record)(torch.randn(2, 8))
    roles = {s.module: (s.role, s.act) for s in found[0]}
    assert roles == {"fc1": ("mlp_in", None), "fc2": ("mlp_down", None), "gate": ("mlp_in", None),
                     "up": ("mlp_in", None), "down": ("mlp_down", "gelu"), "head": ("other", None)}


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=st.sampled_from(["llama", "gpt2"]), layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([4, 8, 16]), kv_div=st.sampled_from([1, 2, 4]), ffn_mult=st.sampled_from([1, 2, 3]),
       ffn_extra=st.integers(0, 9), rows=st.integers(1, 5))
def test_role_counts_random_configs(arch, layers, heads, head_dim, kv_div, ffn_mult, ffn_extra, rows):
    hidden = heads * head_dim
    cfg = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
               intermediate_size=hidden * ffn_mult + ffn_extra)
    if arch == "llama":
        cfg["num_key_value_heads"] = max(1, heads // kv_div)
    model = tiny(arch, **cfg)
    (sites,) = capture_sites(model, rows=rows)
    counts = Counter(s.role for s in sites)
    per_layer = {r: len(sfx) for r, sfx in _layout(arch).items()}
    assert counts == Counter({**{r: n * layers for r, n in per_layer.items()}, "other": 1}), site_table(sites)
    _check_model(arch, model, sites)
