"""greedy_decode: the same tokens as HF generate, eager and compiled, with and without EOS."""

from __future__ import annotations

import pytest
import torch

import actsparse
from actsparse.models import tiny
from tests.masking import linear_names, masked


def _ids(model, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)


def _generate(model, ids, new, **kw):
    return model.generate(ids, max_new_tokens=new, do_sample=False, cache_implementation="static", **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_eager_matches_generate(arch):
    model = tiny(arch)
    ids = _ids(model, 2, 5)
    never = model.config.vocab_size + 7  # an end-of-sequence id no row can produce
    got = actsparse.greedy_decode(model, ids, 9, eos_token_id=never, pad_token_id=0)
    ref = _generate(model, ids, 9, eos_token_id=never, pad_token_id=0)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("check_every", [1, 3, 16])
def test_end_of_sequence_pads_and_trims_like_generate(check_every):
    model = tiny("llama")
    ids = _ids(model, 3, 4, seed=1)
    never = model.config.vocab_size + 7
    free = actsparse.greedy_decode(model, ids, 10, eos_token_id=never)
    for eos in (int(free[0, 4 + 2]), int(free[1, 4 + 6])):  # a token some row produces early / late
        got = actsparse.greedy_decode(model, ids, 10, eos_token_id=eos, pad_token_id=1, check_every=check_every)
        ref = _generate(model, ids, 10, eos_token_id=eos, pad_token_id=1)
        assert torch.equal(got, ref), (eos, got, ref)
    # every row stops at once: decoding ends there
    first = [int(t) for t in free[:, 4]]
    got = actsparse.greedy_decode(model, ids, 10, eos_token_id=first, pad_token_id=1, check_every=check_every)
    assert torch.equal(got, _generate(model, ids, 10, eos_token_id=first, pad_token_id=1))
    assert got.shape[1] == 5


def _dense_prefill_masked_decode(model, plan, ids, new):
    """Independent reference: the prefill unmasked (it runs eagerly, as under HF generate's
    compile_config), then each decode step under the plan's hook masks."""
    from transformers import StaticCache

    b, n = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=n + new)
    with torch.no_grad():
        tok = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n)).logits[:, -1:].argmax(-1)
        toks = [tok]
        with masked(model, plan):
            for i in range(new - 1):
                logits = model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([n + i])).logits
                tok = logits[:, -1:].argmax(-1)
                toks.append(tok)
    return torch.cat([ids] + toks, dim=1)


def test_compiled_sparse_matches_eager_masked():
    model = tiny("llama")
    plan = actsparse.SparsityPlan.from_thresholds(model, {n: 0.3 for n in linear_names(model)})
    ids = _ids(model, 2, 5, seed=2)
    never = model.config.vocab_size + 7
    ref = _dense_prefill_masked_decode(model, plan, ids, 7)
    torch._dynamo.reset()
    actsparse.prepare(model, plan)
    be = actsparse.backend(plan)
    got = actsparse.greedy_decode(model, ids, 7, backend=be, eos_token_id=never)
    again = actsparse.greedy_decode(model, ids, 7, backend=be, eos_token_id=never)  # reuses the compiled step
    assert torch.equal(got, ref) and torch.equal(again, ref)


def test_ignore_eos_always_gives_max_new_tokens():
    model = tiny("llama")
    ids = _ids(model, 2, 4, seed=3)
    never = model.config.vocab_size + 7
    free = actsparse.greedy_decode(model, ids, 6, eos_token_id=never)
    first = [int(t) for t in free[:, 4]]  # would stop every row at once
    assert torch.equal(actsparse.greedy_decode(model, ids, 6, eos_token_id=first, ignore_eos=True), free)


def test_cache_is_reused_zeroed_and_released():
    from actsparse import decode

    model = tiny("llama")
    ids = _ids(model, 2, 5, seed=4)
    never = model.config.vocab_size + 7
    a = actsparse.greedy_decode(model, ids, 6, eos_token_id=never)
    cache = decode._CACHES[model][1]
    other = actsparse.greedy_decode(model, _ids(model, 2, 5, seed=5), 6, eos_token_id=never)
    assert decode._CACHES[model][1] is cache  # same batch, same length bucket: reused
    b = actsparse.greedy_decode(model, ids, 6, eos_token_id=never)
    assert torch.equal(a, b) and not torch.equal(a, other)  # reset: nothing of the last call leaks
    actsparse.greedy_decode(model, ids[:1], 6, eos_token_id=never)
    assert decode._CACHES[model][1] is not cache  # another batch size: a new cache
    decode.release_cache(model)
    assert model not in decode._CACHES


def test_fixed_cache_length_keeps_one_cache_across_lengths():
    from actsparse import decode

    model = tiny("llama")
    ids = _ids(model, 1, 5, seed=6)
    never = model.config.vocab_size + 7
    long = actsparse.greedy_decode(model, ids, 140, eos_token_id=never, cache_length=256)
    cache = decode._CACHES[model][1]
    short = actsparse.greedy_decode(model, ids, 1, eos_token_id=never, cache_length=256)
    assert decode._CACHES[model][1] is cache  # the default would round 6 and 145 to different buckets
    assert torch.equal(short, long[:, :6])
    assert torch.equal(long, actsparse.greedy_decode(model, ids, 140, eos_token_id=never))
    decode.release_cache(model)


def test_zero_new_tokens_returns_the_prompt():
    model = tiny("llama")
    ids = _ids(model, 1, 3)
    assert torch.equal(actsparse.greedy_decode(model, ids, 0), ids)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.zeros(2, 3)), "torch.long"),
    (dict(input_ids=torch.zeros(3, dtype=torch.long)), r"\[batch, length\]"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "at least one token"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(check_every=0), "check_every"),
    (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id=-2), "eos_token_id"),
    (dict(cache_length=4), "cache_length"),
    (dict(cache_length=8.0), "cache_length"),
])
def test_bad_arguments(kwargs, match):
    model = tiny("llama")
    args = dict(input_ids=_ids(model, 1, 3), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        actsparse.greedy_decode(model, **args)
