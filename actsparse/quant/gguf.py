"""GGUF weights kept quantized: ``load(name, keep_quantized=True)``.

A GGUF file stores each weight row (one output) as blocks of 32 input channels. Two block
types map onto ``storage.QuantizedWeight`` without changing a single value:

* ``Q8_0``: 32 int8 and one fp16 scale d per block, ``w = d * q`` -> grouped int8, G = 32;
* ``Q4_1``: 32 4-bit values, an fp16 scale d and an fp16 minimum m per block,
  ``w = d * q + m`` -> our int4 with G = 32 (scales = d, offsets = m).

The model is first loaded as usual (dequantised, from the cache), then every linear whose GGUF
tensor has one of those types becomes a ``QuantLinear`` built from the file's blocks; its
dequantised weight is checked against the dense one (llama.cpp stores q/k rows permuted for its
rotary layout: the permutation is found by that check and applied to the outputs). A tied
output head is read from ``token_embd`` (the embedding itself stays dense: a lookup reads one
row). Other block types (Q4_K, Q5_0, Q6_K, ...) raise ``ValueError`` naming them.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor, nn

from .linear import QuantLinear
from .storage import QuantizedWeight, pack_int4

BLOCK = 32
KEPT = ("Q8_0", "Q4_1")
_LLAMA = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def module_name(tensor: str, tied: bool) -> str | None:
    """The Hugging Face module a GGUF tensor is the weight of (Llama-style names; None: not a linear)."""
    m = _BLK.match(tensor)
    if m and m.group(2) in _LLAMA:
        return f"model.layers.{m.group(1)}.{_LLAMA[m.group(2)]}"
    if tensor == "output.weight" or (tied and tensor == "token_embd.weight"):
        return "lm_head"
    return None


def _blocks(data: np.ndarray, n: int, k: int, size: int) -> Tensor:
    """The raw rows [N, K / 32 blocks, bytes per block] as uint8."""
    return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).reshape(n, k // BLOCK, size)


def _fp16(raw: Tensor) -> Tensor:
    """Little-endian fp16 from [..., 2] bytes, as fp32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def read_q8_0(data: np.ndarray, n: int, k: int) -> QuantizedWeight:
    b = _blocks(data, n, k, 2 + BLOCK)
    d = _fp16(b[..., :2])  # [N, K / 32]
    q = b[..., 2:].contiguous().view(torch.int8).reshape(n, k)
    return QuantizedWeight(q.t().contiguous(), d.t().contiguous(), None, 8, BLOCK, n, k)


def read_q4_1(data: np.ndarray, n: int, k: int) -> QuantizedWeight:
    if n % 2:
        raise ValueError(f"Q4_1 weight with {n} outputs: int4 storage packs two outputs per byte")
    b = _blocks(data, n, k, 4 + BLOCK // 2)
    d, m = _fp16(b[..., :2]), _fp16(b[..., 2:4])
    qs = b[..., 4:]  # byte j: element j (low nibble) and element j + 16 (high nibble)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)
    return QuantizedWeight(pack_int4(q.t()), d.t().contiguous(), m.t().contiguous(), 4, BLOCK, n, k)


READERS = {"Q8_0": read_q8_0, "Q4_1": read_q4_1}


def _rotary_order(n: int, heads: int) -> Tensor:
    """llama.cpp's q/k row order, as the index that brings GGUF rows to Hugging Face's."""
    return torch.arange(n).reshape(heads, n // heads // 2, 2).permute(0, 2, 1).reshape(-1)


def _permute_outputs(qw: QuantizedWeight, order: Tensor) -> QuantizedWeight:
    """The same weight with its outputs (rows of W) taken in ``order``."""
    if qw.bits == 4:
        from .storage import unpack_int4

        q = pack_int4(unpack_int4(qw.qweight)[:, order])
        return QuantizedWeight(q, qw.scales[:, order].contiguous(), qw.offsets[:, order].contiguous(), 4,
                               qw.group_size, qw.out_features, qw.in_features)
    return QuantizedWeight(qw.qweight[:, order].contiguous(), qw.scales[..., order].contiguous(), None, 8,
                           qw.group_size, qw.out_features, qw.in_features)


def _matching(qw: QuantizedWeight, dense: Tensor, heads: list[int], name: str) -> QuantizedWeight:
    """``qw`` in the dense weight's output order (identity, or llama.cpp's rotary permutation)."""
    candidates = [qw] + [_permute_outputs(qw, _rotary_order(qw.out_features, h)) for h in heads
                         if qw.out_features % (2 * h) == 0]
    for c in candidates:
        if torch.allclose(c.dequantize(), dense.float(), rtol=1e-6, atol=1e-6):
            return c
    raise ValueError(f"{name}: the GGUF blocks do not dequantise to the loaded weight (in any known row order)")


def keep_quantized(model: nn.Module, path, model_name: str) -> nn.Module:
    """Replace the model's linears by ``QuantLinear``s read from the GGUF blocks, in place."""
    from gguf import GGUFReader

    cfg = model.config
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    targets = {module_name(n, tied): t for n, t in tensors.items() if module_name(n, tied) is not None}
    other: dict[str, list[str]] = {}
    for n, t in sorted(targets.items()):
        if t.tensor_type.name not in KEPT:
            other.setdefault(t.tensor_type.name, []).append(n)
    if other:
        found = ", ".join(f"{q} ({len(ns)} linears, e.g. {ns[0]})" for q, ns in sorted(other.items()))
        raise ValueError(f"keep_quantized keeps {' and '.join(KEPT)} blocks; {model_name}'s linears also use "
                         f"{found}: load it without keep_quantized (dequantised), or quantize it with "
                         "actsparse.quantize")
    heads = sorted({cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)})
    for name, t in targets.items():
        k, n = (int(x) for x in t.shape)
        lin = dict(model.named_modules()).get(name)
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != (n, k):
            raise ValueError(f"{name}: GGUF tensor {t.name} of shape [{n}, {k}] does not fit {lin}")
        qw = _matching(READERS[t.tensor_type.name](t.data, n, k), lin.weight.detach(), heads, name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(qw, lin.bias))
    if tied:
        cfg.tie_word_embeddings = False  # the head is now its own (quantized) module
    return model
