"""Optional LM-head sparsity: calibrated on request (off by default), compiled like any site."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.calibration import calibrate
from actsparse.calibration.lm_head import add_lm_head_sparsity, head_name
from actsparse.calibration.method import CalibrationError
from actsparse.models import tiny
from tests.masking import masked, prefill_decode


def _tokens(n: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _head_sparsity(model, plan, ids) -> float:
    """Fraction of the head's input entries at or below its threshold, on held-out tokens."""
    got = []
    h = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: got.append(a[0].abs().flatten()))
    with torch.no_grad():
        model(ids)
    h.remove()
    return float((torch.cat(got) <= plan.thresholds[head_name(model)]).float().mean())


def test_off_by_default_and_calibrated_on_request():
    model = tiny("llama")
    base = calibrate(model, _tokens(2000, 0), "teal", 0.5, token_budget=1024, seq_len=64, progress=False)
    assert "lm_head" not in base.thresholds and "lm_head" not in base.input_major_modules(model)
    plan = calibrate(model, _tokens(2000, 0), "teal", 0.5, token_budget=1024, seq_len=64, progress=False,
                     lm_head_sparsity=0.3)
    assert plan.thresholds["lm_head"] > 0 and abs(plan.measured["lm_head"] - 0.3) < 0.02
    assert plan.info["lm_head"] == {"module": "lm_head", "target": 0.3, "tokens": 1024}  # untied: no alias
    assert "lm_head" in plan.input_major_modules(model)
    assert {k: v for k, v in plan.thresholds.items() if k != "lm_head"} == base.thresholds
    held_out = _tokens(512, 7).reshape(8, 64)
    assert abs(_head_sparsity(model, plan, held_out) - 0.3) < 0.05
    # the plan survives its JSON round trip
    again = actsparse.SparsityPlan.from_dict(plan.to_dict(), plan.tensors())
    assert again.thresholds["lm_head"] == plan.thresholds["lm_head"]


@pytest.mark.parametrize("tied", [False, True])
def test_compiled_head_mask_matches_the_hook_reference(tied):
    model = tiny("llama", tie_word_embeddings=tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    plan = actsparse.SparsityPlan(method="teal", target=0.5)
    add_lm_head_sparsity(plan, model, _tokens(1000, 1), 0.5, token_budget=512, seq_len=64)
    g = torch.Generator().manual_seed(3)
    ids, dec = torch.randint(3, 128, (2, 7), generator=g), torch.randint(3, 128, (2, 1), generator=g)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, dec)
    with torch.no_grad():
        dense = model(ids).logits
    assert actsparse.prepare(model, plan) == 1  # the head (and a tied embedding with it) input-major
    assert model.get_output_embeddings().weight.stride() == (1, model.config.vocab_size)
    be = actsparse.backend(plan, compiler="eager")
    torch._dynamo.reset()
    got = prefill_decode(torch.compile(model.forward, backend=be), model, ids, dec)
    for x, y in zip(got, ref):
        assert (x - y).abs().max() <= 2e-4 * y.abs().max() + 1e-5
    assert be.masked_sites > 0
    assert not torch.allclose(ref[0][:, :7] if ref[0].dim() == 3 else ref[0], dense)  # the mask changes logits


def test_wina_plans_get_a_wina_head_threshold():
    model = tiny("llama")
    plan = actsparse.SparsityPlan(thresholds={}, score="wina", method="teal", target=0.5)
    add_lm_head_sparsity(plan, model, _tokens(1000, 1), 0.4, token_budget=512, seq_len=64)
    norms = model.lm_head.weight.float().norm(dim=0)
    got = []
    h = model.lm_head.register_forward_pre_hook(lambda m, a: got.append((a[0].abs() * norms).flatten()))
    with torch.no_grad():
        model(_tokens(512, 1).reshape(8, 64))
    h.remove()
    assert abs(float((torch.cat(got) <= plan.thresholds["lm_head"]).float().mean()) - 0.4) < 0.05


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, True, "0.5"])
def test_bad_sparsity_rejected(bad):
    model = tiny("llama")
    with pytest.raises(CalibrationError, match="lm_head_sparsity"):
        add_lm_head_sparsity(actsparse.SparsityPlan(), model, _tokens(200, 0), bad, token_budget=128, seq_len=32)
