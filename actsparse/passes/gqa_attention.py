"""Grouped-query attention without Hugging Face's ``repeat_kv`` copies.

With a mask (which a static cache always has), Hugging Face's SDPA attention copies every
layer's K and V to the query heads (``repeat_kv``) before calling SDPA: per decode step that is
a copy of the whole cache of every layer and two more launches per layer, time outside the weight
reads that no sparsity removes. SDPA's ``enable_gqa=True`` reads the cache per KV head as it is,
with the same result. This pass points each such SDPA call at the tensors before the copy and
sets ``enable_gqa``; the copies become dead and are erased. Attention that head routing rewrote
is no longer an SDPA call and is left alone; eager attention is left alone too.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .context import PassContext
from .find_attention import SDPA, SDPA_ARGS, strip_repeat_kv
from .graph import erase_orphans, example_value


def _heads(n: fx.Node) -> int | None:
    v = example_value(n)
    return int(v.shape[1]) if isinstance(v, torch.Tensor) and v.dim() == 4 else None


def gqa_attention(gm: fx.GraphModule, ctx: PassContext) -> None:
    if not ctx.gqa_attention:
        return
    graph = gm.graph
    orphans: list[fx.Node] = []
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in SDPA:
            continue
        a = dict(zip(SDPA_ARGS, n.args))
        a.update(n.kwargs)
        if a.get("enable_gqa", False) is not False or a.get("dropout_p", 0.0) not in (0, 0.0):
            continue
        k, v = strip_repeat_kv(a["key"]), strip_repeat_kv(a["value"])
        if k is a["key"] or v is a["value"]:
            continue
        hq, hk, hv = _heads(a["query"]), _heads(k), _heads(v)
        if hq is None or hk is None or hk != hv or hq % hk:
            continue
        orphans.extend([a["key"], a["value"]])
        a.update(key=k, value=v, enable_gqa=True)
        n.args = (a.pop("query"), a.pop("key"), a.pop("value"))
        n.kwargs = a
        ctx.stats.gqa_attention_calls += 1
    if orphans:
        erase_orphans(graph, orphans)
        graph.lint()
        gm.recompile()
