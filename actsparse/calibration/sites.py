"""The sites calibration gathers statistics for, found by the backend's own site discovery.

Calibration must see exactly the sites the backend will mask, so it traces the model once
with Dynamo and runs ``discover_sites`` on the graph, then keeps plain records (names, role,
shapes, gated MLP parts) and drops the graph. Statistics are gathered afterwards with ordinary
module hooks on the named modules, in eager mode.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch

from ..passes.find_sites import discover_sites
from ..plan import linear_weights

MASKED_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_down")


@dataclass(frozen=True)
class SiteRecord:
    """One linear layer of the model and what its input is."""

    module: str  # name in model.named_modules()
    role: str  # attn_in / attn_out / mlp_in / mlp_down / other
    block: int | None  # decoder block index (first integer of the module path)
    in_features: int
    out_features: int
    group: str  # the first module (graph order) reading the same input: q/k/v share one
    gate: str | None = None  # gated MLP down projection: its gate and up modules
    up: str | None = None
    act: str | None = None  # gated MLP down projection: the activation's name

    @property
    def params(self) -> int:
        return self.in_features * self.out_features

    @property
    def masked(self) -> bool:
        """Whether a plan may put a mask on this site's input (the LM head is never masked)."""
        return self.role in MASKED_ROLES


def _example_call(model: torch.nn.Module, example_len: int) -> dict:
    cfg = getattr(model, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0) or 100
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(min(3, vocab - 1), vocab, (1, example_len), generator=g).to(device)
    kwargs = {"input_ids": ids}
    try:
        if "use_cache" in inspect.signature(model.forward).parameters:
            kwargs["use_cache"] = False
    except (TypeError, ValueError):
        pass
    return kwargs


def trace_sites(model: torch.nn.Module, example_len: int = 8) -> list[SiteRecord]:
    """Every linear site of ``model`` with its role, by tracing one short forward with Dynamo.

    Graphs traced from a submodule's frame (after a graph break) name modules relative to
    that frame; their sites are kept only when every name is a module of ``model``, so a
    record never points at the wrong layer. Those left out are reported in one warning.
    """
    known = linear_weights(model)
    modules = {name for name, _ in model.named_modules()}
    graphs: list[list] = []

    def capture(gm, example_inputs):
        graphs.append(discover_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model.forward, backend=capture)(**_example_call(model, example_len))
    finally:
        torch._dynamo.reset()

    records: dict[str, SiteRecord] = {}
    dropped: list[str] = []
    for sites in graphs:
        # rooted at the model: names are the model's (a tied LM head names the embedding)
        if not sites or not all(s.module in modules for s in sites) \
                or not any(s.module in known for s in sites):
            dropped += [s.module for s in sites if s.role != "other"]
            continue
        first_reader: dict = {}
        for s in sites:
            first_reader.setdefault(s.input, s.module)
        for s in sites:
            if s.module in records or s.module not in known:
                continue
            records[s.module] = SiteRecord(
                module=s.module, role=s.role, block=s.block, in_features=s.in_features,
                out_features=s.out_features, group=first_reader[s.input],
                gate=s.gated["gate"].module if s.gated else None,
                up=s.gated["up"].module if s.gated else None, act=s.act)
    if dropped:
        warnings.warn(f"actsparse calibration: {len(dropped)} linear layers were traced from a "
                      f"submodule frame (graph break) and are left out: {', '.join(dropped[:4])}, ...",
                      stacklevel=2)
    return list(records.values())


def masked_sites(sites: list[SiteRecord]) -> list[SiteRecord]:
    return [s for s in sites if s.masked]


def mlp_downs(sites: list[SiteRecord]) -> list[SiteRecord]:
    return [s for s in sites if s.role == "mlp_down"]


def skipped_modules(site: SiteRecord) -> list[str]:
    """The linears an activation mask on this MLP skips work in: up and down, or fc2 alone."""
    return [site.up, site.module] if site.up is not None else [site.module]


def overall_sparsity(sites: list[SiteRecord], measured: dict[str, float]) -> float:
    """Parameter-weighted sparsity over every maskable decoder linear (unmasked count as 0),
    comparable across methods (the LM head excluded)."""
    ms = masked_sites(sites)
    total = sum(s.params for s in ms)
    return sum(measured.get(s.module, 0.0) * s.params for s in ms) / total if total else 0.0


def groups(sites: list[SiteRecord]) -> dict[str, list[SiteRecord]]:
    """Masked sites grouped by shared input, keyed by the group's first module."""
    out: dict[str, list[SiteRecord]] = {}
    for s in masked_sites(sites):
        out.setdefault(s.group, []).append(s)
    return out


def blocks(sites: list[SiteRecord]) -> dict[int | None, list[SiteRecord]]:
    """Masked sites per decoder block, in graph order."""
    out: dict[int | None, list[SiteRecord]] = {}
    for s in masked_sites(sites):
        out.setdefault(s.block, []).append(s)
    return out


def block_module(model: torch.nn.Module, sites: list[SiteRecord]) -> str | None:
    """The module that is the decoder block holding ``sites``: the common path prefix, cut
    after the path component that is the block index (``model.layers.3``)."""
    paths = [s.module.split(".") for s in sites]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    block = sites[0].block
    for i, p in enumerate(common):
        if p.isdigit() and int(p) == block:
            name = ".".join(common[: i + 1])
            return name if name in dict(model.named_modules()) else None
    return None
