"""Mask insertion on its own: ``run_passes`` on a captured Dynamo graph, then the graph inspected
(which actsparse ops it calls, how linears are grouped) and run against the hook reference."""

from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse import ops
from actsparse.models import tiny
from actsparse.ops.dense import masked_gated_mlp, masked_input
from actsparse.ops.limits import CPU_SPARSE_MAX_ROWS
from actsparse.passes.find_sites import placeholder_module
from actsparse.passes.pipeline import run_passes
from actsparse.plan import PlanError, StatTopK
from tests.masking import linear_names, masked

SL = torch.ops.actsparse.sparse_linear.default
GM = torch.ops.actsparse.gated_mlp.default
CSL = torch.ops.actsparse.channel_sparse_linear.default
DECODE, PREFILL = 2, CPU_SPARSE_MAX_ROWS + 3


class Captured:
    """The rewritten graph module, its pass context and the placeholders' (module, param) names."""

    def __init__(self, gm, ctx, owners):
        self.gm, self.ctx, self.owners = gm, ctx, owners

    def calls(self, target):
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target == target]

    def counts(self):
        return Counter(str(n.target) for n in self.gm.graph.nodes if n.op == "call_function")

    def weight_modules(self, node) -> list[str]:
        """Module names of the weights an op call reads (through Conv1D's ``t()`` view)."""
        args = ops.bound_args(node)
        ws = args.get("weights", None) or [args[k] for k in ("w_gate", "w_up", "w_down") if k in args]
        out = []
        for w in ws:
            if w.op == "call_method":
                w = w.args[0]
            out.append(self.owners[w][0])
        return out


def capture(model, plan, rows, batch=1, seed=0):
    """Run ``model`` through a backend that applies ``run_passes`` and runs the rewritten graph as is."""
    got: list[Captured] = []

    def be(gm, example_inputs):
        owners = {n: placeholder_module(n) for n in gm.graph.nodes if n.op == "placeholder"}
        ctx = run_passes(gm, plan, fuse_gated_product=False)  # the masks as insert_masks leaves them
        got.append(Captured(gm, ctx, owners))
        return gm.forward

    ids = torch.randint(1, model.config.vocab_size, (batch, rows), generator=torch.Generator().manual_seed(seed))
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=be, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    assert len(got) == 1
    return got[0], out, ids


def reference(model, plan, ids):
    with torch.no_grad(), masked(model, plan):
        return model(ids).logits


def _close(a, b, tol=2e-4):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-6
    assert err <= tol * scale + 1e-5, f"max abs err {err} (scale {scale})"


def _teal(model, t=0.2, names=None):
    return actsparse.SparsityPlan.from_thresholds(model, {n: t for n in (names or linear_names(model))})


# ------------------------------------------------------------------------------ op counts


@pytest.mark.parametrize("arch, per_layer", [("llama", 3), ("gpt2", 4), ("phi3", 4)])
def test_teal_decode_one_call_per_shared_input(arch, per_layer):
    """q/k/v share a call (llama), gate/up too; o and down have their own."""
    layers = 2
    model = tiny(arch, num_hidden_layers=layers)
    plan = _teal(model)
    cap, out, ids = capture(model, plan, DECODE)
    calls = cap.calls(SL)
    expected = {"llama": 4, "gpt2": 4, "phi3": 4}[arch]
    assert len(calls) == expected * layers
    assert cap.ctx.stats.sparse_linear_calls == len(calls)
    assert cap.ctx.stats.masked_sites == len(linear_names(model))
    assert not cap.calls(GM) and not cap.calls(CSL) and not cap.calls(masked_input)
    groups = sorted(tuple(m.rsplit(".", 1)[-1] for m in cap.weight_modules(n)) for n in calls)
    if arch == "llama":
        assert groups.count(("q_proj", "k_proj", "v_proj")) == layers
        assert groups.count(("gate_proj", "up_proj")) == layers
    # every output of every call is read through getitem, never the op's list itself
    for n in calls:
        assert all(u.target is operator.getitem for u in n.users)
        assert ops.bound_args(n)["per_token"] is False
    # the LM head is never masked by a plan that does not name it
    assert not any(m in ("lm_head", "transformer.wte") for n in calls for m in cap.weight_modules(n))
    _close(out, reference(model, plan, ids))


def test_fixed_and_per_token_thresholds_never_share_a_call():
    model = tiny("llama", num_hidden_layers=1)
    q = "model.layers.0.self_attn.q_proj"
    plan = actsparse.SparsityPlan.from_thresholds(model, {q: 0.3})
    plan.stat_topk = StatTopK(0.4)
    cap, out, ids = capture(model, plan, DECODE)
    calls = cap.calls(SL)
    by_modules = {tuple(cap.weight_modules(n)): ops.bound_args(n)["per_token"] for n in calls}
    assert by_modules[(q,)] is False
    assert by_modules[("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")] is True
    for n in calls:  # each call is all fixed or all per-token
        assert isinstance(ops.bound_args(n)["per_token"], bool)
    assert len(calls) == 5  # q | k,v | o | gate,up | down
    assert len({n.args[0] for n in calls if cap.weight_modules(n)[0].endswith(("q_proj", "k_proj"))}) == 1
    # reference: q masked by its threshold only (a threshold rule takes precedence over stat-top-k)
    z = plan.stat_topk.multiplier
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            def hook(m, args, fixed=(name == q)):
                x = args[0]
                cut = 0.3 if fixed else z * x.float().abs().mean(-1, keepdim=True)
                return (torch.where(x.abs().float() > cut, x, torch.zeros((), dtype=x.dtype)),)
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            ref = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    _close(out, ref)


def test_cats_decode_is_one_gated_call_per_mlp():
    model = tiny("llama", num_hidden_layers=2)
    downs = [n for n in linear_names(model) if n.endswith("down_proj")]
    plan = actsparse.SparsityPlan.from_thresholds(model, {}, activation_thresholds={d: 0.1 for d in downs})
    cap, out, ids = capture(model, plan, DECODE)
    calls = cap.calls(GM)
    assert len(calls) == 2 and not cap.calls(SL) and cap.ctx.stats.gated_mlp_calls == 2
    for n in calls:
        args = ops.bound_args(n)
        assert args["act"] == "silu" and args["threshold"] == 0.1 and args["per_token"] is False
        mods = cap.weight_modules(n)
        assert [m.rsplit(".", 1)[-1] for m in mods] == ["gate_proj", "up_proj", "down_proj"]
    _close(out, reference(model, plan, ids))


def test_wina_decode_and_prefill_use_the_channel_op():
    model = tiny("llama", num_hidden_layers=1)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in linear_names(model)}, score="wina")
    for rows in (DECODE, PREFILL):
        cap, out, ids = capture(model, plan, rows)
        calls = cap.calls(CSL)
        assert len(calls) == 4 and not cap.calls(SL) and not cap.calls(masked_input)
        assert len(cap.ctx.constants.keys) == 4
        keys = [ops.bound_args(n)["cutoffs_key"] for n in calls]
        assert sorted(keys) == sorted(cap.ctx.constants.keys)
        _close(out, reference(model, plan, ids))
        ops.constants.release(tuple(cap.ctx.constants.keys))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefill_rows_get_the_masked_dense_form_decode_rows_the_op(arch):
    model = tiny(arch, num_hidden_layers=1)
    plan = _teal(model, 0.25)
    for rows, batch in ((1, 1), (CPU_SPARSE_MAX_ROWS, 1), (2, 2), (PREFILL, 1), (3, 2)):
        cap, out, ids = capture(model, plan, rows, batch=batch)
        decode = rows * batch <= CPU_SPARSE_MAX_ROWS
        n_inputs = 4  # shared inputs: attention in, attention out, MLP in, MLP down
        assert len(cap.calls(SL)) == (n_inputs if decode else 0), (rows, batch)
        assert len(cap.calls(masked_input)) == (0 if decode else n_inputs), (rows, batch)
        assert cap.ctx.stats.masked_sites == len(linear_names(model))
        _close(out, reference(model, plan, ids))
        if not decode:
            assert "(dense, %d rows)" % (rows * batch) in cap.ctx.table


def test_cats_prefill_is_the_masked_dense_gated_form():
    model = tiny("qwen3", num_hidden_layers=1)
    down = "model.layers.0.mlp.down_proj"
    plan = actsparse.SparsityPlan.from_thresholds(model, {}, activation_thresholds={down: 0.05})
    cap, out, ids = capture(model, plan, PREFILL)
    assert len(cap.calls(masked_gated_mlp)) == 1 and not cap.calls(GM)
    _close(out, reference(model, plan, ids))


def test_plain_mlp_cats_rule_masks_the_down_input():
    model = tiny("gpt2", num_hidden_layers=1)
    down = "transformer.h.0.mlp.c_proj"
    plan = actsparse.SparsityPlan.from_thresholds(model, {}, activation_thresholds={down: 0.1})
    cap, out, ids = capture(model, plan, DECODE)
    (call,) = cap.calls(SL)
    assert cap.weight_modules(call) == [down] and not cap.calls(GM)
    assert down in cap.ctx.stats.found_rules
    _close(out, reference(model, plan, ids))


def test_cats_and_input_thresholds_on_one_mlp_is_a_plan_error():
    model = tiny("llama", num_hidden_layers=1)
    plan = actsparse.SparsityPlan.from_thresholds(
        model, {"model.layers.0.mlp.up_proj": 0.1}, activation_thresholds={"model.layers.0.mlp.down_proj": 0.1})
    errors = []

    def be(gm, example_inputs):
        try:
            run_passes(gm, plan)
        except PlanError as e:
            errors.append(e)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=be)(torch.tensor([[1, 2]]))
    torch._dynamo.reset()
    assert len(errors) == 1
    assert "model.layers.0.mlp.down_proj" in str(errors[0]) and "up_proj" in str(errors[0])


# -------------------------------------------------------------------- input-major weights


@pytest.mark.parametrize("kind", ["teal", "cats", "wina", "stat", "prefill"])
def test_input_major_inputs_are_the_ops_input_sparse_weights(kind):
    model = tiny("llama", num_hidden_layers=1)
    names = linear_names(model)
    rows = PREFILL if kind == "prefill" else DECODE
    if kind == "cats":
        plan = actsparse.SparsityPlan.from_thresholds(
            model, {}, activation_thresholds={"model.layers.0.mlp.down_proj": 0.1})
    elif kind == "stat":
        plan = actsparse.SparsityPlan.statistical(0.4)
    else:
        plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.2 for n in names},
                                                      score="wina" if kind == "wina" else "abs")
    cap, _, _ = capture(model, plan, rows)
    placeholders = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    declared = {w for n in cap.gm.graph.nodes for w in ops.input_sparse_weights(n)}
    assert cap.ctx.input_major_inputs == sorted(placeholders.index(w) for w in declared)
    modules = {cap.owners[placeholders[i]][0] for i in cap.ctx.input_major_inputs}
    if kind == "cats":  # only down is read input-sparse; gate and up are read by rows
        assert modules == {"model.layers.0.mlp.down_proj"}
    elif kind == "prefill":  # the masked dense form reads nothing input-sparse
        assert modules == set()
    else:
        assert modules == set(names)
    assert all(cap.owners[placeholders[i]][1] == "weight" for i in cap.ctx.input_major_inputs)
    ops.constants.release(tuple(cap.ctx.constants.keys))


# ------------------------------------------------------------------ random plans vs hooks


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(arch=st.sampled_from(["llama", "qwen2", "gpt2"]), data=st.data(), rows=st.integers(1, 7),
       batch=st.integers(1, 2), cats=st.booleans(), wina=st.booleans())
def test_random_plans_match_hook_reference(arch, data, rows, batch, cats, wina):
    model = tiny(arch, num_hidden_layers=1)
    names = linear_names(model)
    acts = {}
    if cats and arch != "gpt2":
        down = "model.layers.0.mlp.down_proj"
        acts = {down: data.draw(st.sampled_from([0.0, 0.05, 0.2]), label="cats t")}
        mlp = {down, "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
        names = [n for n in names if n not in mlp]  # an MLP takes CATS or input thresholds
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)), label="masked")
    thresholds = {n: data.draw(st.sampled_from([0.0, 0.1, 0.3, 0.8, 1e9]), label=n) for n in chosen}
    plan = actsparse.SparsityPlan.from_thresholds(model, thresholds, activation_thresholds=acts,
                                                  score="wina" if wina and not acts else "abs")
    cap, out, ids = capture(model, plan, rows, batch=batch)
    _close(out, reference(model, plan, ids))
    assert cap.ctx.stats.found_rules == set(chosen) | set(acts)
    ops.constants.release(tuple(cap.ctx.constants.keys))


class MixedBias(torch.nn.Module):
    """Three linears on one input, two with a bias and one without (as Whisper's k_proj)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 6)
        self.o = torch.nn.Linear(18, 4)

    def forward(self, x):
        return self.o(torch.cat([self.q(x), self.k(x), self.v(x)], -1))


def test_sites_with_and_without_bias_get_separate_calls_and_train():
    """A bias list mixing None and tensors would get no gradients through torch.library: the
    pass splits such a group in two calls, so grad-mode forward and backward work."""
    model = MixedBias()
    plan = actsparse.SparsityPlan(thresholds={"q": 0.2, "k": 0.3, "v": 0.4})
    got = []

    def be(gm, example_inputs):
        got.append(run_passes(gm, plan))
        got.append([n for n in gm.graph.nodes if n.op == "call_function" and n.target == SL])
        return gm.forward

    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    out = torch.compile(model, backend=be)(x)
    ctx, calls = got
    assert len(calls) == 2
    assert sorted(len(ops.bound_args(n)["biases"]) for n in calls) == [1, 2]
    for n in calls:
        biases = ops.bound_args(n)["biases"]
        assert all(b is None for b in biases) or all(b is not None for b in biases)
    out.pow(2).sum().backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hooks = [getattr(model, n).register_forward_pre_hook(
        lambda m, a, t=t: (torch.where(a[0].abs() > t, a[0], torch.zeros(())),)) for n, t in plan.thresholds.items()]
    model(x).pow(2).sum().backward()
    for h in hooks:
        h.remove()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got_grads[n], p.grad, msg=n)
    torch._dynamo.reset()
