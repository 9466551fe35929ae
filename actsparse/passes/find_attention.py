"""Find the attention computations of a Dynamo graph: what head routing needs to rewrite them.

For each attention, found from the graph alone:

* the anchor, the node whose output is the attention result [B, Hq, Tq, D]: a
  ``scaled_dot_product_attention`` call, or the ``softmax(q k^T * scale + mask) @ v`` matmul of
  an eager implementation (never a bare matmul: rotary embeddings are matmuls too);
* for SDPA: q, the K/V cache tensors per KV head [B, Hkv, S, D] before Hugging Face's
  ``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``, which copies the cache every step),
  the mask, scale and is_causal;
* the site whose input is the attention block's input x (q_proj, or a fused qkv): the only
  linear behind q;
* the o_proj site, reached from the anchor through reshapes only.

The KV-cache writes (``index_copy_`` / ``copy_`` on the cache inputs) stay where they are: the
rewrite inserts its op at the anchor, after them, so it reads the updated cache as the original
attention did. An attention whose surroundings do not match is left alone (dense).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .find_sites import Site
from .graph import example_value

SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
MATMULS = {torch.matmul, operator.matmul, torch.bmm}
RESHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "to"}
RESHAPE_FUNCS = {torch.reshape, torch.transpose, torch.permute, torch.flatten}
CASTS = {"to", "float", "type", "type_as", "half", "bfloat16"}


@dataclass
class Attention:
    kind: str  # "sdpa" or "eager"
    anchor: fx.Node
    q: fx.Node
    x_site: Site  # the linear reading the block input (q_proj or a fused qkv)
    o_site: Site  # the output projection
    num_heads: int
    head_dim: int
    # SDPA only: the cache per KV head, the mask and the call's options
    k: fx.Node | None = None
    v: fx.Node | None = None
    num_kv_heads: int = 0
    mask: fx.Node | None = None
    scale: float = 0.0
    is_causal: bool = False


def _shape(n) -> tuple | None:
    v = example_value(n) if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_call(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _is_method(n, names) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


def strip_repeat_kv(kv: fx.Node) -> fx.Node:
    """The tensor before HF's repeat_kv: ``x[:, :, None].expand(B, Hkv, r, S, D).reshape(B, Hq, S, D)``."""
    if _is_method(kv, {"reshape", "view"}) and _is_method(kv.args[0], {"expand"}):
        gi = kv.args[0].args[0]
        if _is_call(gi, {operator.getitem}) and isinstance(gi.args[1], tuple) and len(gi.args[1]) == 5 \
                and gi.args[1][2] is None:
            return gi.args[0]
    return kv


def _site_behind(start: fx.Node, sites: dict[fx.Node, Site], limit: int = 400) -> Site | None:
    """The one linear site reached walking back from ``start`` (not through other sites)."""
    found: set[fx.Node] = set()
    seen, stack = set(), [start]
    while stack and len(seen) < limit:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in sites:
            found.add(n)
            continue
        if n.op != "placeholder":
            stack.extend(n.all_input_nodes)
    return sites[found.pop()] if len(found) == 1 else None


def _o_site(anchor: fx.Node, sites: dict[fx.Node, Site]) -> Site | None:
    """The output projection fed by ``anchor`` through single-user reshapes only."""
    cur = anchor
    for _ in range(12):
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        s = sites.get(u)
        if s is not None:
            return s if s.input is cur or (s.kind == "addmm" and _feeds(cur, s.input)) else None
        if not (_is_method(u, RESHAPE_METHODS) or _is_call(u, RESHAPE_FUNCS)):
            return None
        cur = u
    return None


def _feeds(a: fx.Node, b: fx.Node) -> bool:
    return b is a or (_is_method(b, RESHAPE_METHODS) and b.args[0] is a)


def _eager_anchor(sm: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(PV matmul, q) of ``softmax(... q @ k^T ...) @ v`` around the softmax ``sm``, or None."""
    dim = sm.kwargs.get("dim", sm.args[1] if len(sm.args) > 1 else None)
    shp = _shape(sm)
    if shp is None or dim is None or dim % len(shp) != len(shp) - 1:
        return None
    cur = sm.args[0]
    for _ in range(8):  # back through casts, scale and mask to the scores matmul
        if _is_call(cur, MATMULS):
            break
        if not isinstance(cur, fx.Node) or not (_is_method(cur, CASTS | {"mul", "add", "div"}) or
                                                _is_call(cur, {operator.mul, operator.add, operator.truediv,
                                                               torch.mul, torch.add})):
            return None
        cur = next((a for a in cur.args if isinstance(a, fx.Node) and _leads_to_matmul(a)), None)
    else:
        return None
    if not _is_call(cur, MATMULS):
        return None
    q = cur.args[0]
    out = sm
    for _ in range(4):  # forward through casts and dropout to the PV matmul
        users = list(out.users)
        if len(users) != 1:
            return None
        u = users[0]
        if _is_call(u, MATMULS) and u.args[0] is out:
            return u, q
        if not (_is_method(u, CASTS) or _is_call(u, {F.dropout})):
            return None
        out = u
    return None


def _leads_to_matmul(n: fx.Node, steps: int = 6) -> bool:
    for _ in range(steps):
        if _is_call(n, MATMULS):
            return True
        ins = [a for a in getattr(n, "args", ()) if isinstance(a, fx.Node)]
        if not ins:
            return False
        n = ins[0]
    return False


def find_attention(gm: fx.GraphModule, sites: list[Site]) -> list[Attention]:
    """Every attention of ``gm`` that head routing can rewrite, in graph order."""
    by_node = {s.node: s for s in sites if not s.rewritten}
    found = []
    for n in list(gm.graph.nodes):
        if _is_call(n, SDPA):
            a = dict(zip(SDPA_ARGS, n.args))
            a.update(n.kwargs)
            if a.get("dropout_p", 0.0) not in (0, 0.0) or a.get("enable_gqa", False) not in (False, True):
                continue
            q, k, v = a["query"], strip_repeat_kv(a["key"]), strip_repeat_kv(a["value"])
            qs, ks, vs = _shape(q), _shape(k), _shape(v)
            if qs is None or ks is None or vs is None or len(qs) != 4 or len(ks) != 4:
                continue
            if qs[1] % ks[1] or vs[:3] != ks[:3] or ks[3] != qs[3]:
                continue
            att = Attention("sdpa", n, q, None, None, qs[1], qs[3], k=k, v=v, num_kv_heads=ks[1],
                            mask=a.get("attn_mask"), is_causal=bool(a.get("is_causal", False)),
                            scale=float(a["scale"]) if a.get("scale") is not None else 1.0 / math.sqrt(qs[3]))
        elif _is_call(n, {F.softmax, torch.softmax}) or _is_method(n, {"softmax"}):
            hit = _eager_anchor(n)
            if hit is None:
                continue
            anchor, q = hit
            qs = _shape(q)
            if qs is None or len(qs) != 4:
                continue
            att = Attention("eager", anchor, q, None, None, qs[1], qs[3])
        else:
            continue
        att.x_site = _site_behind(att.q, by_node)
        att.o_site = _o_site(att.anchor, by_node)
        if att.x_site is not None and att.o_site is not None and att.o_site.in_features == att.num_heads * att.head_dim:
            found.append(att)
    return found
