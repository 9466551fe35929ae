"""The rsparse pass: compiled sparse + low-rank linears against an eager hook reference."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.calibration.sites import masked_sites, trace_sites
from actsparse.ops.reference import rsparse_linear_reference
from actsparse.plan import PlanError, SparsityPlan, fingerprint
from actsparse.plan.rules.rsparse import LowRankSparse
from actsparse.models import tiny
from tests.masking import prefill_decode

MODEL = tiny("llama")
SITES = masked_sites(trace_sites(MODEL))


def _plan(seed: int, full: bool = False) -> SparsityPlan:
    """Random thresholds and ranks on every masked linear (rank 0, low and full among them)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(MODEL.named_modules())
    specs, tensors = {}, {}
    for s in SITES:
        w = mods[s.module].weight.detach()
        n, k = w.shape
        r = min(n, k) if full else int(torch.randint(0, min(n, k) + 1, (1,), generator=g))
        t = float(torch.rand((), generator=g)) * 0.1
        specs[s.module] = {"threshold": t, "sparsity": 0.5, "rank": r, "in_features": k, "out_features": n}
        if r:
            u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
            tensors[f"{s.module}.a"], tensors[f"{s.module}.b"] = (u[:, :r] * sv[:r]).float(), vh[:r].float()
    return SparsityPlan(rules=[LowRankSparse(specs, tensors)], method="rsparse", model=fingerprint(MODEL))


@contextlib.contextmanager
def applied(model, plan):
    """The plan applied eagerly: each linear's output replaced by the reference formula."""
    rule, mods, handles = plan.rule(LowRankSparse), dict(model.named_modules()), []

    def hook(name):
        pair = rule.pair(name)

        def fn(mod, args, out):
            a, b = pair if pair is not None else (None, None)
            return rsparse_linear_reference(args[0], mod.weight, mod.bias, rule.specs[name]["threshold"], a, b)
        return fn

    for name in rule.specs:
        handles.append(mods[name].register_forward_hook(hook(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _ids(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (2, 6), generator=g), torch.randint(3, 128, (2, 2), generator=g)


def _compiled(plan, ids, dec):
    be = actsparse.backend(plan, compiler="eager")
    torch._dynamo.reset()
    try:
        return prefill_decode(torch.compile(MODEL.forward, backend=be), MODEL, ids, dec), be
    finally:
        torch._dynamo.reset()


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**16))
def test_compiled_matches_the_eager_reference(seed):
    plan = _plan(seed)
    ids, dec = _ids(seed)
    got, be = _compiled(plan, ids, dec)
    with applied(MODEL, plan):
        ref = prefill_decode(MODEL.forward, MODEL, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max() <= 2e-4 * y.abs().max() + 1e-5
    assert be.masked_sites == be.graphs * len(SITES)  # every linear masked, in prefill and decode graphs


def test_full_rank_reproduces_dense_and_adds_one_lowrank_op_per_ranked_linear():
    plan = _plan(0, full=True)
    ids, dec = _ids(1)
    counted = []

    def count(gm, example_inputs):
        out = actsparse.backend(plan, compiler="eager")(gm, example_inputs)
        counted.append(sum(n.target is torch.ops.actsparse.lowrank_complement.default for n in gm.graph.nodes))
        return out

    torch._dynamo.reset()
    got = prefill_decode(torch.compile(MODEL.forward, backend=count), MODEL, ids, dec)
    torch._dynamo.reset()
    ref = prefill_decode(MODEL.forward, MODEL, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max() <= 2e-4 * y.abs().max() + 1e-5
    assert counted and all(c == len(SITES) for c in counted)


def test_another_rule_on_the_same_linear_is_refused():
    plan = _plan(2)
    plan.thresholds = {SITES[0].module: 0.1}
    with pytest.raises(Exception, match="rsparse rule and another rule"):
        _compiled(plan, *_ids(0))


@pytest.mark.slow
def test_inductor_compiled_matches_the_eager_reference():
    plan = _plan(5)
    ids, dec = _ids(5)
    torch._dynamo.reset()
    try:
        got = prefill_decode(torch.compile(MODEL.forward, backend=actsparse.backend(plan)), MODEL, ids, dec)
    finally:
        torch._dynamo.reset()
    with applied(MODEL, plan):
        ref = prefill_decode(MODEL.forward, MODEL, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max() <= 2e-4 * y.abs().max() + 1e-5
