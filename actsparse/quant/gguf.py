"""GGUF weights kept quantized: ``load(name, keep_quantized=True)``.

A GGUF file stores each weight row (one output) as blocks of input channels. These block types
map onto ``storage.QuantizedWeight`` without changing a single value:

* ``Q8_0``: 32 int8 and one fp16 scale d per block, ``w = d * q`` -> grouped int8, G = 32;
* ``Q5_0``: 32 5-bit values and one fp16 scale d, ``w = d * (q - 16)`` -> grouped int8, G = 32
  (codes -16..15: a byte per weight where the file spends 5.5 bits);
* ``Q4_1``: 32 4-bit values, an fp16 scale d and an fp16 minimum m per block,
  ``w = d * q + m`` -> our int4 with G = 32 (scales = d, offsets = m);
* ``Q4_K``: super-blocks of 256 holding 8 sub-blocks of 32, each with a 6-bit scale and minimum
  under the super-block's fp16 d and dmin, ``w = d * sc * q - dmin * m`` -> int4, G = 32
  (scales = d * sc, offsets = -dmin * m, both exact in fp32);
* ``Q6_K``: super-blocks of 256 holding 16 sub-blocks of 16 with an int8 scale each under an
  fp16 d, ``w = d * sc * (q - 32)`` -> grouped int8 with G = 16 (codes -32..31), the one
  storage here with 16-channel groups: the kernels take any group width that divides K.

The model is first loaded as usual (dequantised, from the cache), then every linear whose GGUF
tensor has one of those types becomes a ``QuantLinear`` built from the file's blocks; its
dequantised weight is checked against the dense one (llama.cpp stores q/k rows permuted for its
rotary layout: the permutation is found by that check and applied to the outputs). A tied
output head is read from ``token_embd`` (the embedding itself stays dense: a lookup reads one
row). Other block types (Q5_1, Q2_K, Q3_K, Q5_K, IQ*, ...) raise ``ValueError`` naming them.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor, nn

from .linear import QuantLinear
from .storage import QuantizedWeight, pack_int4

BLOCK = 32
#: Elements in a K-quant super-block.
SUPER = 256
KEPT = ("Q8_0", "Q5_0", "Q4_1", "Q4_K", "Q6_K")
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


def _blocks(data: np.ndarray, n: int, k: int, size: int, elems: int = BLOCK) -> Tensor:
    """The raw rows [N, K / elems blocks, bytes per block] as uint8."""
    if k % elems:
        raise ValueError(f"input width {k} is not a multiple of the block's {elems} elements")
    return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).reshape(n, k // elems, size)


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


def read_q5_0(data: np.ndarray, n: int, k: int) -> QuantizedWeight:
    b = _blocks(data, n, k, 2 + 4 + BLOCK // 2)
    d = _fp16(b[..., :2])
    high = b[..., 2:6].to(torch.int64)  # element j's fifth bit is bit j of this little-endian word
    word = high[..., 0] | high[..., 1] << 8 | high[..., 2] << 16 | high[..., 3] << 24
    fifth = (word[..., None] >> torch.arange(BLOCK)) & 1  # [N, blocks, 32]
    qs = b[..., 6:]  # byte j: element j (low nibble) and element j + 16 (high nibble)
    low = torch.cat([qs & 0xF, qs >> 4], dim=-1).to(torch.int64)
    q = (low | fifth << 4) - 16
    return QuantizedWeight(q.reshape(n, k).t().to(torch.int8).contiguous(), d.t().contiguous(), None, 8, BLOCK, n, k)


def _k_scales_mins(raw: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K's 8 six-bit scales and minimums from its 12 bytes [..., 12]: sub-blocks 0-3 in the
    low six bits of bytes 0-3 (scales) and 4-7 (minimums); sub-blocks 4-7 in the nibbles of
    bytes 8-11, their two high bits in the top bits of bytes 0-3 (scales) and 4-7 (minimums)."""
    a, b, c = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = torch.cat([a & 0x3F, (c & 0xF) | ((a >> 6) << 4)], dim=-1)
    mins = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return scales.float(), mins.float()


def read_q4_k(data: np.ndarray, n: int, k: int) -> QuantizedWeight:
    if n % 2:
        raise ValueError(f"Q4_K weight with {n} outputs: int4 storage packs two outputs per byte")
    b = _blocks(data, n, k, 4 + 12 + SUPER // 2, SUPER)
    d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])  # [N, K / 256]
    sc, m = _k_scales_mins(b[..., 4:16])  # [N, K / 256, 8]
    scales = (d[..., None] * sc).reshape(n, k // BLOCK)
    offsets = -(dmin[..., None] * m).reshape(n, k // BLOCK)
    qs = b[..., 16:].reshape(n, k // SUPER, 4, 1, 32)  # 32 bytes hold sub-blocks 2c (low) and 2c + 1 (high)
    q = torch.cat([qs & 0xF, qs >> 4], dim=3).reshape(n, k)
    return QuantizedWeight(pack_int4(q.t()), scales.t().contiguous(), offsets.t().contiguous(), 4, BLOCK, n, k)


def read_q6_k(data: np.ndarray, n: int, k: int) -> QuantizedWeight:
    b = _blocks(data, n, k, SUPER // 2 + SUPER // 4 + SUPER // 16 + 2, SUPER)
    ql, qh = b[..., :128].to(torch.int64), b[..., 128:192].to(torch.int64)
    sc = b[..., 192:208].contiguous().view(torch.int8).float()  # [N, K / 256, 16]
    d = _fp16(b[..., 208:210])
    # Each half of 128 elements: rows of 32 from ql bytes [0:32] low, [32:64] low, [0:32] high,
    # [32:64] high nibbles, with two high bits from qh byte l at shifts 0, 2, 4, 6.
    ql = ql.reshape(n, k // SUPER, 2, 1, 2, 32)
    low = torch.cat([ql & 0xF, ql >> 4], dim=3).reshape(n, k // SUPER, 2, 4, 32)
    high = (qh.reshape(n, k // SUPER, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).reshape(4, 1)) & 3
    q = ((low | high << 4) - 32).reshape(n, k)
    scales = (d[..., None] * sc).reshape(n, k // 16)
    return QuantizedWeight(q.t().to(torch.int8).contiguous(), scales.t().contiguous(), None, 8, 16, n, k)


READERS = {"Q8_0": read_q8_0, "Q5_0": read_q5_0, "Q4_1": read_q4_1, "Q4_K": read_q4_k, "Q6_K": read_q6_k}


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
        raise ValueError(f"keep_quantized keeps {', '.join(KEPT)} blocks; {model_name}'s linears also use "
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
