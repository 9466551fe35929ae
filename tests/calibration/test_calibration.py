"""Calibration: histograms, the five methods, their plans, and the plans' compiled semantics."""

from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actsparse
from actsparse.calibration import (METHODS, CalibrationError, Calibrator, LogHistogram, calibrate, greedy_for,
                                   token_batches, trace_sites)
from actsparse.calibration.command import add_calibrate_arguments, run_calibrate_command
from actsparse.calibration.sites import masked_sites
from actsparse.models import tiny
from actsparse.plan import PlanError, SparsityPlan
from tests.masking import masked, prefill_decode


def _tokens(n: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def calibrators():
    """One statistics pass per architecture serves every method (llama: gated, gpt2: plain MLP)."""
    out = {}
    for arch in ("llama", "gpt2"):
        model = tiny(arch)
        cal = Calibrator(model, _tokens(3000, 0), token_budget=2048, seq_len=64, progress=False,
                         cett_tokens=4096, greedy_step=0.04, wina=True)
        greedy_for(cal, 0.5)  # one greedy path serves every target up to 0.5
        out[arch] = (model, cal)
    return out


# ------------------------------------------------------------------ sites


def test_trace_sites_finds_roles_groups_and_gated_parts():
    sites = {s.module: s for s in trace_sites(tiny("llama"))}
    p = "model.layers.0."
    assert sites[p + "self_attn.q_proj"].role == "attn_in"
    assert sites[p + "self_attn.k_proj"].group == sites[p + "self_attn.v_proj"].group == p + "self_attn.q_proj"
    assert sites[p + "self_attn.o_proj"].role == "attn_out"
    assert sites[p + "mlp.up_proj"].group == p + "mlp.gate_proj"
    down = sites[p + "mlp.down_proj"]
    assert (down.role, down.gate, down.up, down.act, down.block) == (
        "mlp_down", p + "mlp.gate_proj", p + "mlp.up_proj", "silu", 0)
    assert sites["lm_head"].role == "other" and not sites["lm_head"].masked


# ------------------------------------------------------------------ histograms


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 3000), dist=st.sampled_from(["normal", "lognormal", "zeros", "tiny", "huge"]),
       scale=st.floats(1e-4, 1e4), qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_histogram_quantile_brackets_the_exact_quantile(n, dist, scale, qs, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if dist == "lognormal":
        x = torch.exp(torch.randn(n, generator=g) * 3) * scale
    elif dist == "zeros":
        x = x * (torch.rand(n, generator=g) < 0.5)
    elif dist == "tiny":
        x = x * 1e-8
    elif dist == "huge":
        x = x * 1e8  # the bins span 2**-48 .. 2**48
    h = LogHistogram()
    for part in x.split(97):  # streaming: several updates
        h.update(part)
    v = x.abs().float().sort().values
    rw = h.relative_width
    for q in qs:
        t = h.quantile(q)
        if q == 0.0:  # a 0% target masks nothing: threshold 0 by definition
            assert t == 0.0
            continue
        exact = float(torch.quantile(v, q))
        # within one bin of the order statistics around the exact quantile (ranks differ by
        # at most one between torch's interpolation and the histogram's count target)
        k = q * (n - 1)
        lo = float(v[max(0, int(k) - 1)])
        hi = float(v[min(n - 1, int(k) + 2)])
        # values under the lowest bin edge (2**-48) count as that bin: allow it on both sides
        assert lo * (1 - rw) - 2.0**-48 <= t <= hi * (1 + rw) + 2.0**-48, (q, t, exact, lo, hi)


def test_histogram_quantiles_within_one_bin_on_dense_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.exp(torch.randn(200_000, generator=g))
    h = LogHistogram()
    h.update(x)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        exact = float(torch.quantile(x.abs(), q))
        t = h.quantile(q)
        assert abs(t - exact) <= h.relative_width * exact, (q, t, exact)
        assert abs(h.cdf(t) - q) < 1e-3
    # WINA's score: a per-channel scale multiplies before binning
    c = torch.rand(8, generator=g) + 0.5
    y = torch.randn(1000, 8, generator=g)
    a, b = LogHistogram(), LogHistogram()
    a.update(y, scale=c)
    b.update(y * c)
    assert torch.equal(a.counts, b.counts)
    assert h.quantile(0.0) == 0.0 and h.cdf(float(x.abs().max()) * 2) == 1.0


# ------------------------------------------------------------------ methods


def _sparsity_of_masked_model(model, plan, ids) -> float:
    """Parameter-weighted fraction of zeroed inputs that the eagerly masked model shows."""
    counts: dict[str, float] = {}
    sites = masked_sites(trace_sites(model))
    mods = dict(model.named_modules())

    def count(name):
        def hook(mod, args):
            counts[name] = float((args[0] == 0).float().mean())
        return hook

    with masked(model, plan), torch.no_grad():
        handles = [mods[s.module].register_forward_pre_hook(count(s.module)) for s in sites]
        try:
            model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
    return sum(counts[s.module] * s.params for s in sites) / sum(s.params for s in sites)


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_teal_sparsity_on_held_out_tokens_is_within_two_points(calibrators, target):
    model, cal = calibrators["llama"]
    plan = cal.plan("teal", target)
    assert plan.overall_sparsity == pytest.approx(target, abs=0.01)
    held_out = _tokens(4 * 128, seed=1).reshape(4, 128)
    assert _sparsity_of_masked_model(model, plan, held_out) == pytest.approx(target, abs=0.02)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_meets_the_parameter_weighted_target_in_every_block(calibrators, arch):
    model, cal = calibrators[arch]
    target = 0.4
    plan = cal.plan("teal-greedy", target)
    per_block: dict[int, list[tuple[float, int]]] = {}
    for s in masked_sites(cal.sites):
        per_block.setdefault(s.block, []).append((plan.measured[s.module], s.params))
    for block, items in per_block.items():
        f = sum(m * p for m, p in items) / sum(p for _, p in items)
        assert target - 0.005 <= f <= target + 0.05, (block, f)
    assert all(v >= target - 1e-9 for v in plan.info["greedy"]["block_sparsity"].values())
    assert len(set(plan.thresholds.values())) > 2  # allocation is not uniform


def _cett_errors(model, plan, ids) -> dict[str, float]:
    """CETT recomputed directly: ||W_down (h * [|a| <= t])|| / ||MLP output||, averaged."""
    from actsparse.ops.reference import activation

    sites = {s.module: s for s in trace_sites(model) if s.role == "mlp_down"}
    mods = dict(model.named_modules())
    acts, errs, handles = {}, {}, []

    def on_gate(down):
        def hook(mod, args, out):
            acts[down] = activation(sites[down].act, out)
        return hook

    def on_down(down):
        def hook(mod, args, out):
            h = args[0]
            a = acts.pop(down, h)
            w = mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.t()
            dropped = (h * (a.abs() <= plan.activation_thresholds[down])) @ w.t()
            errs[down] = float((dropped.norm(dim=-1) / out.norm(dim=-1)).mean())
        return hook

    for down, s in sites.items():
        if s.gate is not None:
            handles.append(mods[s.gate].register_forward_hook(on_gate(down)))
        handles.append(mods[down].register_forward_hook(on_down(down)))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return errs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cett_error_on_calibration_tokens_is_within_the_budget(calibrators, arch):
    model, cal = calibrators[arch]
    ids = torch.cat(cal.batches)
    for budget in (0.05, 0.2):
        plan = cal.plan("cett", error_budget=budget)
        errs = _cett_errors(model, plan, ids)
        assert errs and all(e <= budget + 1e-4 for e in errs.values()), errs
        assert max(errs.values()) > 0.5 * budget  # the budget is used, not left idle
        assert plan.target is None and plan.info["cett"]["error_budget"] == budget
    # a target sparsity instead of a budget: the budget is searched to reach it
    plan = cal.plan("cett", 0.4)
    downs = [s for s in cal.sites if s.role == "mlp_down"]
    mlp = sum(plan.measured[s.module] for s in downs) / len(downs)
    assert 0.4 - 0.005 <= mlp <= 0.45
    assert plan.info["cett"]["budget_searched_for_target"]


def test_cats_and_stat_topk_record_what_they_mask(calibrators):
    model, cal = calibrators["llama"]
    cats = cal.plan("cats", 0.5)
    assert set(cats.activation_thresholds) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert not cats.thresholds and "model.layers.0.mlp.gate_proj" not in cats.measured
    assert cats.measured["model.layers.0.mlp.up_proj"] == pytest.approx(0.5, abs=0.01)
    # up + down masked, gate and attention dense: a fraction of all maskable weights
    sites = masked_sites(cal.sites)
    share = sum(s.params for s in sites if s.module.endswith(("up_proj", "down_proj"))) / sum(s.params for s in sites)
    assert cats.overall_sparsity == pytest.approx(0.5 * share, abs=0.01)
    st_plan = cal.plan("stat-topk", 0.5)
    assert st_plan.stat_topk is not None and st_plan.stat_topk.sparsity == 0.5
    assert len(st_plan.measured) == len(sites) and 0.3 < st_plan.overall_sparsity < 0.8


@pytest.mark.parametrize("method", [n for n, m in METHODS.items() if m.from_statistics])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_methods_plan_compiles_to_the_hook_reference(calibrators, arch, method):
    model, cal = calibrators[arch]
    plan = cal.plan(method, 0.5)
    assert plan.method == method and plan.model is not None and plan.roles and plan.measured
    assert plan.info["tokens"] == 2048 and plan.info["seed"] == 0
    g = torch.Generator().manual_seed(3)
    ids, dec = torch.randint(3, 128, (2, 7), generator=g), torch.randint(3, 128, (2, 1), generator=g)
    be = actsparse.backend(plan, compiler="eager")
    torch._dynamo.reset()
    got = prefill_decode(torch.compile(model.forward, backend=be), model, ids, dec)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max() <= 2e-4 * y.abs().max() + 1e-5
    assert be.masked_sites > 0


@pytest.mark.parametrize("method", ["teal", "teal-greedy"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wina_plans_compile_to_the_hook_reference(calibrators, arch, method):
    """WINA: thresholds on |x_i| * ||W[:, i]||, one per linear, masked the same way when compiled."""
    model, cal = calibrators[arch]
    plan = cal.plan(method, 0.4, wina=True)
    assert plan.score == "wina" and plan.overall_sparsity == pytest.approx(0.4, abs=0.03)
    qkv = [s.module for s in cal.sites if s.role == "attn_in"][:3]
    if arch == "llama":  # q, k and v share an input but have their own WINA thresholds
        assert len({plan.thresholds[m] for m in qkv}) > 1
    g = torch.Generator().manual_seed(4)
    ids, dec = torch.randint(3, 128, (2, 7), generator=g), torch.randint(3, 128, (1, 1), generator=g)[:1]
    for batch_ids, batch_dec in ((ids, torch.randint(3, 128, (2, 1), generator=g)), (ids[:1], dec)):
        be = actsparse.backend(plan, compiler="eager")
        torch._dynamo.reset()
        got = prefill_decode(torch.compile(model.forward, backend=be), model, batch_ids, batch_dec)
        with masked(model, plan):
            ref = prefill_decode(model.forward, model, batch_ids, batch_dec)
        for x, y in zip(got, ref):
            assert (x - y).abs().max() <= 2e-4 * y.abs().max() + 1e-5
        rules = {s.rule.split(" ")[0] for s in be.sites if s.module in plan.thresholds}
        assert be.masked_sites > 0 and rules == {"wina"}, rules


def test_wina_sparsity_on_held_out_tokens(calibrators):
    model, cal = calibrators["llama"]
    plan = cal.plan("teal", 0.5, wina=True)
    held_out = _tokens(4 * 128, seed=1).reshape(4, 128)
    from actsparse.ops.reference import wina_cutoffs
    mods = dict(model.named_modules())
    counts = {}

    def hook(name, tau):
        def pre(mod, args):
            counts[name] = (args[0].abs().float() <= tau).float().mean().item()
        return pre
    hs = [mods[n].register_forward_pre_hook(hook(n, wina_cutoffs(mods[n].weight, t)))
          for n, t in plan.thresholds.items()]
    try:
        with torch.no_grad():
            model(input_ids=held_out)
    finally:
        for h in hs:
            h.remove()
    sites = [s for s in cal.sites if s.module in plan.thresholds]
    got = sum(counts[s.module] * s.params for s in sites) / sum(s.params for s in sites)
    assert got == pytest.approx(0.5, abs=0.03)


# ------------------------------------------------------------------ plans and errors


def test_plan_round_trip_and_mismatched_model(calibrators, tmp_path):
    model, cal = calibrators["llama"]
    plan = cal.plan("teal-greedy", 0.5)
    path = plan.save(tmp_path / "plan.json")
    again = SparsityPlan.load(path, model=model)
    assert again.to_dict() == plan.to_dict()
    with pytest.raises(PlanError, match="weight shapes differ"):
        SparsityPlan.load(path, model=tiny("llama", intermediate_size=96))
    with pytest.raises(PlanError, match="made for a"):
        SparsityPlan.load(path, model=tiny("qwen2"))


def test_calibrate_shortcut_and_argument_errors():
    model = tiny("llama", num_hidden_layers=1)
    plan = calibrate(model, _tokens(600, 0), "teal", 0.25, token_budget=512, seq_len=32, progress=False,
                     source="random tokens")
    assert plan.info["source"] == "random tokens" and plan.target == 0.25
    with pytest.raises(CalibrationError, match="unknown method"):
        calibrate(model, _tokens(100, 0), "magic", progress=False)
    with pytest.raises(CalibrationError, match=r"\[0, 1\)"):
        calibrate(model, _tokens(100, 0), "teal", 1.5, progress=False)
    with pytest.raises(CalibrationError, match="applies to methods teal, teal-greedy only"):
        calibrate(model, _tokens(100, 0), "cats", 0.5, wina=True, progress=False)
    with pytest.raises(CalibrationError, match="applies to method cett only"):
        calibrate(model, _tokens(100, 0), "teal", 0.5, error_budget=0.1, progress=False)
    with pytest.raises(CalibrationError, match="tokenizer"):
        calibrate(model, ["some text"], "teal", 0.5, progress=False)


def test_token_batches_budget_and_shapes():
    batches, info = token_batches(_tokens(1000, 0), token_budget=256, batch_size=3, seq_len=64)
    assert [tuple(b.shape) for b in batches] == [(3, 64), (1, 64)]
    assert info["tokens"] == 256 and info["sequences"] == 4
    short, info = token_batches([5, 6, 7], token_budget=256, seq_len=64)
    assert short[0].tolist() == [[5, 6, 7]] and info["tokens"] == 3


def _cli(*argv: str) -> argparse.Namespace:
    return add_calibrate_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (("--method", "magic"), "unknown method"),
    (("--sparsity", "1.0"), "--sparsity"),
    (("--method", "teal", "--error-budget", "0.1"), "--error-budget applies to method cett only"),
    (("--method", "cats", "--wina"), "--wina applies to methods teal, teal-greedy only"),
    (("--tokens", "0"), "--tokens"),
    (("--data", "/nonexistent-dir"), "not found"),
])
def test_cli_usage_errors_exit_2_before_loading(argv, message, capsys, tmp_path):
    args = _cli(*argv, "--out", str(tmp_path / "p.json"))
    assert run_calibrate_command(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_requires_out():
    with pytest.raises(SystemExit):
        _cli("--method", "teal")
