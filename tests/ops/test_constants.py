"""Backend constants (WINA cutoffs, predictor weights) live exactly as long as the compiled code.

A pass registers the tensors its ops read in a ``ConstantScope``; the backend ties the scope to
the compiled callable, so dropping the compiled code (``torch._dynamo.reset()``) releases
them, and a lookup of a released key says so clearly.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch

import actsparse
from actsparse.models import tiny
from actsparse.ops import constants
from actsparse.plan.fingerprint import fingerprint
from tests.masking import linear_names


def _wina_plan(model):
    return actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in linear_names(model)}, score="wina")


def _predictor_plan(model, rank=4):
    g = torch.Generator().manual_seed(0)
    preds, tensors = {}, {}
    for name, mod in model.named_modules():
        if not all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
            continue
        n, d = mod.gate_proj.weight.shape
        down = f"{name}.down_proj"
        preds[down] = {"gate": f"{name}.gate_proj", "up": f"{name}.up_proj", "act": "silu", "rank": rank,
                       "in_features": d, "neurons": n, "selection": "topk", "keep": n // 2, "threshold": 0.0}
        tensors[f"{down}.w1"] = torch.randn(rank, d, generator=g)
        tensors[f"{down}.w2"] = torch.randn(n, rank, generator=g)
        tensors[f"{down}.b2"] = torch.randn(n, generator=g)
    return actsparse.SparsityPlan(method="predictor", predictors=preds, predictor_tensors=tensors,
                                  model=fingerprint(model))


def _keys_added(before: set[str]) -> list[str]:
    return sorted(set(constants._STORE) - before)


def _run(model, plan, compiler="eager", rows=1):
    fast = torch.compile(model, backend="sparse", options={"plan": plan, "compiler": compiler})
    with torch.no_grad():
        out = fast(torch.randint(1, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(0)))
    return fast, out


def _drop(*refs):
    torch._dynamo.reset()
    del refs
    gc.collect()


@pytest.mark.parametrize("kind, per_layer", [("wina", 4), ("predictor", 1)])
def test_constants_released_with_the_compiled_code(kind, per_layer):
    layers = 2
    model = tiny("llama", num_hidden_layers=layers)
    plan = _wina_plan(model) if kind == "wina" else _predictor_plan(model)
    torch._dynamo.reset()
    gc.collect()
    live0, before = constants.live(), set(constants._STORE)
    fast, _ = _run(model, plan)
    added = _keys_added(before)
    # WINA: q/k/v, o, gate/up and down calls per layer; predictors: one per MLP
    assert constants.live() == live0 + per_layer * layers, added
    assert all(k.startswith("wina:" if kind == "wina" else "predictor:") for k in added)
    _drop(fast)
    del fast
    gc.collect()
    assert constants.live() == live0
    assert not set(added) & set(constants._STORE)


def test_constants_released_with_inductor_compiled_code():
    model = tiny("llama", num_hidden_layers=1)
    torch._dynamo.reset()
    gc.collect()
    live0 = constants.live()
    fast, _ = _run(model, _wina_plan(model), compiler="inductor")
    assert constants.live() == live0 + 4
    del fast
    _drop()
    assert constants.live() == live0


def test_constants_live_while_the_compiled_code_does():
    """Garbage collection alone does not free what a live compiled graph reads; recompiling for
    new rows adds the new graph's constants next to the old ones."""
    model = tiny("llama", num_hidden_layers=1)
    plan = _wina_plan(model)
    torch._dynamo.reset()
    gc.collect()
    live0 = constants.live()
    fast, first = _run(model, plan)
    gc.collect()
    assert constants.live() == live0 + 4
    with torch.no_grad():  # same graph again: nothing new, the constants still read
        again = fast(torch.randint(1, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(again.logits, first.logits)
    n = constants.live()
    assert n >= live0 + 4
    del fast
    _drop()
    assert constants.live() == live0


def test_released_key_lookup_is_a_clear_error():
    model = tiny("llama", num_hidden_layers=1)
    torch._dynamo.reset()
    gc.collect()
    before = set(constants._STORE)
    fast, _ = _run(model, _wina_plan(model))
    key = next(k for k in _keys_added(before) if "q_proj" in k)
    cutoffs = constants.lookup(key)
    assert len(cutoffs) == 3 and all(isinstance(t, torch.Tensor) for t in cutoffs)  # q, k, v
    del fast
    _drop()
    with pytest.raises(RuntimeError, match=r"constant 'wina:.*q_proj#\d+' is not registered.*released"):
        constants.lookup(key)
    x = torch.randn(1, model.config.hidden_size)
    ws = [model.model.layers[0].self_attn.q_proj.weight.detach()]
    with pytest.raises(RuntimeError, match="not registered"):
        torch.ops.actsparse.channel_sparse_linear(x, ws, [None], key, 0.5)
    with pytest.raises(RuntimeError, match="not registered"):
        torch.ops.actsparse.predict_mask(x, key, 8, 2, 0.0, True)


def test_scope_bind_and_release_directly():
    class Owner:
        def __call__(self):
            return None

    live0 = constants.live()
    scope = constants.ConstantScope()
    k1 = scope.add("a", torch.zeros(3))
    k2 = scope.add("a", torch.ones(2), torch.ones(1))
    assert k1 != k2 and constants.live() == live0 + 2  # one name, distinct keys
    assert len(constants.lookup(k2)) == 2
    owner = Owner()
    scope.bind(owner)
    gc.collect()
    assert constants.live() == live0 + 2
    del owner
    gc.collect()
    assert constants.live() == live0
    constants.ConstantScope().bind(Owner())  # an empty scope binds nothing


def test_failed_compilation_releases_its_constants(monkeypatch):
    """A compilation that raises after the passes registered constants leaves none behind."""
    model = tiny("llama", num_hidden_layers=1)
    backend_mod = sys.modules["actsparse.compiler.backend"]

    def boom(*a, **k):
        raise RuntimeError("inductor failed")

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", boom)
    torch._dynamo.reset()
    gc.collect()
    live0 = constants.live()
    fast = torch.compile(model, backend=backend_mod.backend(_wina_plan(model)))
    with pytest.raises(Exception, match="inductor failed"):
        with torch.no_grad():
            fast(torch.tensor([[1, 2]]))
    del fast
    _drop()
    assert constants.live() == live0
