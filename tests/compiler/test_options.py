"""Backend options on their own: parsing, the calibration-free default, mode, plan paths."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import actsparse
from actsparse.compiler.options import COMPILERS, DEFAULT_SPARSITY, MODES, RELAYOUTS, BackendOptions, OptionsError
from actsparse.models import tiny
from tests.masking import linear_names, masked

backend_mod = sys.modules["actsparse.compiler.backend"]


# ----------------------------------------------------------------------------------- parse


def test_no_options_is_the_statistical_default():
    o = BackendOptions.parse(None)
    assert o.plan_was_default and o.plan.stat_topk is not None
    assert o.plan.stat_topk.sparsity == DEFAULT_SPARSITY
    assert not o.plan.thresholds and not o.plan.activation_thresholds
    assert (o.cudagraphs, o.debug, o.relayout, o.mode, o.inductor, o.compiler) == (False, False, "lazy", None, {},
                                                                                    "inductor")
    assert "statistical top-k" in o.default_note and f"{DEFAULT_SPARSITY:g}" in o.default_note
    assert BackendOptions.parse({}).plan_was_default


@pytest.mark.parametrize("options", [
    {"sparsity": 0.5}, {"sparsity": 0}, {"sparsity": 0.0}, {"sparsity": 0.999},
    {"cudagraphs": True}, {"cudagraphs": False}, {"debug": True},
    *({"relayout": r} for r in RELAYOUTS), *({"compiler": c} for c in COMPILERS),
    {"inductor": {}}, {"inductor": {"max_autotune": True, "triton.cudagraphs": False}},
])
def test_accepted(options):
    o = BackendOptions.parse(options)
    for k, v in options.items():
        if k == "sparsity":
            assert o.plan.stat_topk.sparsity == v and not o.plan_was_default
        else:
            assert getattr(o, k) == v


@pytest.mark.parametrize("options, match", [
    ({"colour": 1}, r"unknown backend option\(s\) \['colour'\]; allowed: plan: .*sparsity: .*compiler: "),
    ({"plans": "p.json", "sparsty": 0.1}, r"\['plans', 'sparsty'\]"),
    ({"plan": 3}, r"option 'plan' must be a SparsityPlan or the path of a saved plan, got int"),
    ({"sparsity": "0.5"}, r"option 'sparsity' must be a target in \[0, 1\).*got str"),
    ({"sparsity": True}, r"option 'sparsity' must be .*got True"),
    ({"sparsity": 1.0}, r"option 'sparsity' must be in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, r"option 'sparsity' must be in \[0, 1\)"),
    ({"sparsity": float("nan")}, r"option 'sparsity' must be in \[0, 1\)"),
    ({"cudagraphs": "yes"}, r"option 'cudagraphs' must be True to run the compiled graph under CUDA graphs.*got str"),
    ({"cudagraphs": 1}, r"option 'cudagraphs' must be True.*got int"),
    ({"debug": None}, r"option 'debug' must be True to print"),
    ({"relayout": "sideways"}, r"option 'relayout' must be one of \('lazy', 'off'\), got 'sideways'"),
    ({"relayout": False}, r"option 'relayout' must be how masked weights become input-major: one of"),
    ({"inductor": ["max_autotune"]}, r"option 'inductor' must be extra Inductor config patches.*got list"),
    ({"inductor": {"no_such_knob": 1}}, r"option 'inductor' has keys Inductor does not know: \['no_such_knob'\]"),
    ({"compiler": "aot_eager"}, r"option 'compiler' must be one of \('inductor', 'eager'\), got 'aot_eager'"),
    ({"compiler": None}, r"option 'compiler' must be what compiles the rewritten graph"),
])
def test_rejected_with_the_option_and_what_is_allowed(options, match):
    with pytest.raises(OptionsError, match=match):
        BackendOptions.parse(options)


def test_options_error_is_a_value_error():
    assert issubclass(OptionsError, ValueError)


@pytest.mark.parametrize("mode", [m for m in MODES])
def test_modes_accepted(mode):
    o = BackendOptions.parse(None, mode)
    assert o.mode == mode
    assert o.cudagraphs == (mode == "reduce-overhead")


def test_unknown_mode_is_rejected_naming_the_allowed_ones():
    with pytest.raises(OptionsError, match=r"mode 'fastest' is not supported; allowed: .*'reduce-overhead'"):
        BackendOptions.parse(None, "fastest")


def test_reduce_overhead_sets_cudagraphs():
    o = BackendOptions.parse(None, "reduce-overhead")
    assert o.cudagraphs and o.plan_was_default
    assert o.config_patches().get("triton.cudagraphs") is True
    assert BackendOptions.parse({"cudagraphs": True}).config_patches() == {"triton.cudagraphs": True}
    assert "triton.cudagraphs" not in BackendOptions.parse(None).config_patches()
    # the user's Inductor patches come last: they win
    o = BackendOptions.parse({"inductor": {"triton.cudagraphs": False}}, "reduce-overhead")
    assert o.config_patches()["triton.cudagraphs"] is False


def test_plan_and_sparsity_together_is_an_error(tmp_path):
    plan = actsparse.SparsityPlan(thresholds={"a.b": 0.1})
    for p in (plan, str(plan.save(tmp_path / "p.json"))):
        with pytest.raises(OptionsError, match=r"give either 'plan' or 'sparsity', not both"):
            BackendOptions.parse({"plan": p, "sparsity": 0.5})


def test_plan_given_as_a_path_is_loaded(tmp_path):
    model = tiny("llama", num_hidden_layers=1)
    plan = actsparse.SparsityPlan.from_thresholds(model, {"model.layers.0.mlp.down_proj": 0.2})
    path = plan.save(tmp_path / "sub" / "plan.json")
    for given in (str(path), Path(path)):
        o = BackendOptions.parse({"plan": given})
        assert isinstance(o.plan, actsparse.SparsityPlan) and o.plan == plan and not o.plan_was_default
    same = BackendOptions.parse({"plan": plan})
    assert same.plan is plan
    with pytest.raises(FileNotFoundError, match="plan file not found.*missing.json"):
        BackendOptions.parse({"plan": str(tmp_path / "missing.json")})


# ----------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_backends(monkeypatch):
    """Forget the backends of earlier tests (the default plan's note is given once per backend)."""
    monkeypatch.setattr(backend_mod, "_BACKENDS", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _notes(record):
    return [w for w in record if "no plan given" in str(w.message)]


def _ids(model, rows, seed=0):
    return torch.randint(1, model.config.vocab_size, (1, rows), generator=torch.Generator().manual_seed(seed))


def test_bare_one_liner_compiles_warns_once_and_is_stat_topk_at_the_default(fresh_backends):
    model = tiny("llama", num_hidden_layers=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast = torch.compile(model, backend="sparse")  # Inductor, no options at all
        with torch.no_grad():
            outs = [fast(_ids(model, rows, rows)).logits for rows in (5, 1, 2)]  # several graphs
    notes = _notes(record)
    assert len(notes) == 1, [str(w.message) for w in notes]
    text = str(notes[0].message)
    assert "statistical top-k" in text and f"sparsity {DEFAULT_SPARSITY:g}" in text
    ref_plan = actsparse.SparsityPlan.statistical(DEFAULT_SPARSITY)
    for rows, out in zip((5, 1, 2), outs):
        with torch.no_grad(), masked(model, ref_plan):
            ref = model(_ids(model, rows, rows)).logits
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
        with torch.no_grad():  # and the default does mask something
            assert (model(_ids(model, rows, rows)).logits - ref).abs().max() > 1e-3
    (be,) = [b for _, b in backend_mod._BACKENDS.values()]
    assert be.masked_sites > 0 and be.options.plan_was_default


def test_sparsity_option_gives_no_warning(fresh_backends):
    model = tiny("llama", num_hidden_layers=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast = torch.compile(model, backend="sparse", options={"sparsity": 0.4, "compiler": "eager"})
        with torch.no_grad():
            out = fast(_ids(model, 3)).logits
    assert not _notes(record)
    with torch.no_grad(), masked(model, actsparse.SparsityPlan.statistical(0.4)):
        ref = model(_ids(model, 3)).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_plan_option_gives_no_warning_and_path_works_end_to_end(fresh_backends, tmp_path):
    model = tiny("llama", num_hidden_layers=1)
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in linear_names(model)})
    path = plan.save(tmp_path / "plan.json")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast = torch.compile(model, backend="sparse", options={"plan": str(path), "compiler": "eager"})
        with torch.no_grad():
            out = fast(_ids(model, 2)).logits
    assert not _notes(record)
    with torch.no_grad(), masked(model, plan):
        ref = model(_ids(model, 2)).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_reduce_overhead_mode_without_options_is_accepted(fresh_backends):
    model = tiny("llama", num_hidden_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = torch.compile(model, backend="sparse", mode="reduce-overhead")
        with torch.no_grad():
            out = fast(_ids(model, 1)).logits
    (be,) = [b for _, b in backend_mod._BACKENDS.values()]
    assert be.options.mode == "reduce-overhead" and be.options.cudagraphs
    assert be.options.config_patches()["triton.cudagraphs"] is True
    with torch.no_grad(), masked(model, actsparse.SparsityPlan.statistical(DEFAULT_SPARSITY)):
        ref = model(_ids(model, 1)).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_bad_options_fail_the_compilation_with_the_message(fresh_backends):
    fast = torch.compile(lambda x: x + 1, backend="sparse", options={"sparsity": 0.5, "plan": "p.json"})
    with pytest.raises(Exception, match="give either 'plan' or 'sparsity'"):
        fast(torch.randn(3))
