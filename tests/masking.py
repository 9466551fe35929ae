"""Independent eager references for tests: masks applied by module hooks, not by the passes."""

from __future__ import annotations

import torch
from transformers import StaticCache

from actsparse.eval.masked import masked  # noqa: F401  (the hook reference, re-exported for the tests)


def prefill_decode(fwd, model, ids: torch.Tensor, decode: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill over ``ids`` then one decode step per column of ``decode``.

    The decode tokens are given (not argmax) so that two models that differ by rounding still
    see the same inputs.
    """
    b, n = ids.shape
    steps = decode.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + steps + 1)
    outs = []
    with torch.no_grad():
        out = fwd(input_ids=ids, past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(n))
        outs.append(out.logits)
        for i in range(steps):
            out = fwd(input_ids=decode[:, i:i + 1], past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([n + i]))
            outs.append(out.logits)
    return outs


def linear_names(model: torch.nn.Module) -> list[str]:
    """Every linear-like module except the output head: the sites a plan may mask."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head]


def compiled_prefill_decode(model, plan, ids: torch.Tensor, decode: torch.Tensor,
                            compiler: str = "eager") -> list[torch.Tensor]:
    """``prefill_decode`` through the sparse backend with ``plan`` (Dynamo reset before and after,
    so the next compile in a test starts clean)."""
    import actsparse

    torch._dynamo.reset()
    try:
        return prefill_decode(torch.compile(model.forward, backend=actsparse.backend(plan, compiler=compiler)),
                              model, ids, decode)
    finally:
        torch._dynamo.reset()


def token_inputs(batch: int, seq: int, steps: int, seed: int = 0, low: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded prompt [batch, seq] and decode tokens [batch, steps] for a tiny model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 128, (batch, seq), generator=g), torch.randint(low, 128, (batch, steps), generator=g)


def assert_close_outputs(got, ref, tol: float = 2e-4) -> None:
    """Each output within ``tol`` of its reference's largest magnitude (plus a small floor)."""
    for x, y in zip(got, ref):
        err = (x - y).abs().max().item()
        scale = y.abs().max().item() + 1e-6
        assert err <= tol * scale + 1e-5, f"max abs err {err} (scale {scale})"


class CountingBackend:
    """The sparse backend, counting the calls to ``target`` in the graphs it hands on."""

    def __init__(self, plan, compiler: str, target):
        import actsparse

        self.be = actsparse.backend(plan, compiler=compiler)
        self.target = target
        self.calls = 0

    def __call__(self, gm, example_inputs):
        compiled = self.be(gm, example_inputs)
        self.calls += sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == self.target)
        return compiled


def assert_matches_masked(model, plan, backend, ids: torch.Tensor, decode: torch.Tensor, tol: float = 2e-4) -> None:
    """The model compiled with ``backend`` equals the eager model masked by ``plan``'s hooks,
    over a prefill and its decode steps."""
    torch._dynamo.reset()
    got = prefill_decode(torch.compile(model.forward, backend=backend), model, ids, decode)
    with masked(model, plan):
        ref = prefill_decode(model.forward, model, ids, decode)
    assert_close_outputs(got, ref, tol)
