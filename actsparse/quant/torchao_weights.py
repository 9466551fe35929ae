"""torchao's weight-only quantized linears, read into our input-major storage.

``torchao.quantization.quantize_(model, Int8WeightOnlyConfig())`` leaves each nn.Linear with a
tensor-subclass weight; Dynamo lifts it as one placeholder whose value is that subclass, and the
linear stays ``torch._C._nn.linear(x, w, b)``. For a masked linear the passes take the
subclass's quantized data and scales (never a dequantised float copy), store them once
input-major (``storage.QuantizedWeight``), and cache the result on the parameter, so a second
graph (prefill, another batch size) reuses it. Linears that share an input and a threshold get
one joined copy instead (``input_major_joined``), cached on the first one's parameter.

Supported (torchao >= 0.18, weight-only, CPU and CUDA):

* ``Int8Tensor`` (``Int8WeightOnlyConfig()``, per row; ``granularity=PerGroup(G)``): symmetric,
  -> int8 with one scale per output, or grouped int8 (G in ``GROUP_SIZES``);
* ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig(weight_dtype=torch.int4 | torch.int8,
  granularity=PerGroup(G) | PerAxis(0))``): int4 -> our int4 (q + 8 in 0..15, the zero point
  folded into the offset ``-(8 + zp) * s``: exact); int8 symmetric -> int8 / grouped int8.

Anything else (``Int4WeightOnlyConfig``'s packed formats, dynamic activation quantization, an
asymmetric int8 weight) raises ``UnsupportedTorchaoWeight`` naming the type and what works.
The input-major copy is an int8 / packed int4 transpose of torchao's data: it adds the
quantized weight's bytes once, not a float copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .storage import GROUP_SIZES, QuantizedWeight, concat_outputs, pack_int4

MIN_VERSION = (0, 18)
SUPPORTED = ("Int8Tensor (Int8WeightOnlyConfig, per row or PerGroup(32|64|128))",
             "IntxUnpackedToInt8Tensor (IntxWeightOnlyConfig with weight_dtype int4 or int8, "
             "PerGroup(32|64|128) or PerAxis(0))")
_CACHE = "_actsparse_input_major"
#: Which torchao config makes each weight type (for the error message).
_MADE_BY = {
    "Int8Tensor": "Int8WeightOnlyConfig / Int8DynamicActivationInt8WeightConfig",
    "IntxUnpackedToInt8Tensor": "IntxWeightOnlyConfig / Int8DynamicActivationIntxWeightConfig",
    "Int4Tensor": "Int4WeightOnlyConfig(int4_packing_format='plain')",
    "Int4TilePackedTo4dTensor": "Int4WeightOnlyConfig(int4_packing_format='tile_packed_to_4d')",
    "Int4PreshuffledTensor": "Int4WeightOnlyConfig(int4_packing_format='preshuffled')",
    "Int4PlainInt32Tensor": "Int4WeightOnlyConfig(int4_packing_format='plain_int32')",
    "IntxOpaqueTensor": "IntxWeightOnlyConfig(intx_packing_format='opaque_...')",
    "Float8Tensor": "Float8WeightOnlyConfig / Float8DynamicActivationFloat8WeightConfig",
}


class UnsupportedTorchaoWeight(TypeError):
    """A torchao weight this backend cannot read as input-major storage."""


def is_torchao_weight(value: object) -> bool:
    """Is ``value`` (a real or fake tensor) one of torchao's quantized tensor subclasses?
    Checked by module name, so torchao is never imported here."""
    return isinstance(value, Tensor) and type(value).__module__.split(".")[0] == "torchao"


def _version() -> str:
    try:
        import torchao

        return str(getattr(torchao, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - a partial install: report what we can
        return "unknown"


def _unsupported(w: Tensor, why: str) -> UnsupportedTorchaoWeight:
    name = type(w).__name__
    made_by = f", made by {_MADE_BY[name]}" if name in _MADE_BY else ""
    return UnsupportedTorchaoWeight(
        f"actsparse cannot run a sparse kernel over torchao {_version()}'s {name} weight{made_by} "
        f"(shape {tuple(w.shape)}): {why}. Supported: torchao >= {'.'.join(map(str, MIN_VERSION))}, "
        f"weight-only: {'; '.join(SUPPORTED)}. Leave this linear out of the plan, or quantize with "
        "one of those configs (or actsparse.quantize).")


def check_version(w: Tensor) -> None:
    v = _version()
    try:
        parts = tuple(int(p) for p in v.split("+")[0].split(".")[:2])
    except ValueError:
        raise _unsupported(w, f"unrecognised torchao version {v!r}") from None
    if parts < MIN_VERSION:
        raise _unsupported(w, f"torchao {v} is older than the layouts this reads")


def _block(w: Tensor) -> tuple[int, int]:
    """(rows, input channels) per scale; the rows must be 1 (one scale per output)."""
    block = getattr(w, "block_size", None)
    if block is None or len(block) != 2:
        raise _unsupported(w, "no 2-D block_size")
    rows, group = int(block[0]), int(block[1])
    if rows != 1:
        raise _unsupported(w, f"block_size {tuple(block)} shares a scale across output rows")
    return rows, group


def _group(w: Tensor, k: int, group: int) -> int:
    """0 for one scale per output (the block spans the input), else a checked group size."""
    if group == k:
        return 0
    if group not in GROUP_SIZES or k % group:
        raise _unsupported(w, f"group size {group} (input width {k}); groups of {GROUP_SIZES} are read")
    return group


def _int8(w: Tensor, q: Tensor, scale: Tensor, zp: Tensor | None) -> QuantizedWeight:
    n, k = q.shape
    if zp is not None and bool((zp != 0).any()):
        raise _unsupported(w, "asymmetric int8 (nonzero zero points); our int8 storage is symmetric")
    group = _group(w, k, _block(w)[1])
    s = scale.reshape(n, -1)  # [N, K / G] (1 column per row for one scale per output)
    scales = s[:, 0].contiguous() if group == 0 else s.t().contiguous()
    return QuantizedWeight(q.t().contiguous(), scales, None, 8, group, n, k)


def _int4(w: Tensor, q: Tensor, scale: Tensor, zp: Tensor | None) -> QuantizedWeight:
    n, k = q.shape
    group = _group(w, k, _block(w)[1]) or k
    if group not in GROUP_SIZES:
        raise _unsupported(w, f"int4 with group size {group}; groups of {GROUP_SIZES} are read")
    if n % 2:
        raise _unsupported(w, f"int4 with an odd number of outputs ({n}); two are packed per byte")
    s = scale.reshape(n, k // group).float()
    z = torch.zeros_like(s) if zp is None else zp.reshape(n, k // group).float()
    u = (q.to(torch.int16) + 8).clamp_(0, 15)  # torchao's int4 values are -8..7
    if not torch.equal(u - 8, q.to(torch.int16)):
        raise _unsupported(w, "int4 values outside -8..7")
    offsets = (-(8 + z) * s).to(scale.dtype)
    return QuantizedWeight(pack_int4(u.t()), s.t().to(scale.dtype).contiguous(), offsets.t().contiguous(),
                           4, group, n, k)


def to_input_major(w: Tensor) -> QuantizedWeight:
    """torchao weight [N, K] -> our input-major storage (see the module docstring)."""
    check_version(w)
    name = type(w).__name__
    q, scale, zp = (getattr(w, a, None) for a in ("qdata", "scale", "zero_point"))
    if not all(isinstance(t, Tensor) for t in (q, scale)) or q.dim() != 2:
        raise _unsupported(w, "no 2-D qdata / scale tensors")
    if name == "Int8Tensor":
        if getattr(w, "act_quant_kwargs", None) is not None:
            raise _unsupported(w, "it quantizes activations too (a dynamic-activation config)")
        return _int8(w, q, scale, zp)
    if name == "IntxUnpackedToInt8Tensor":
        if getattr(w, "activation_quantization", None) is not None:
            raise _unsupported(w, "it quantizes activations too")
        target = getattr(w, "target_dtype", None)
        if target == torch.int8:
            return _int8(w, q, scale, zp)
        if target == getattr(torch, "int4", None):
            return _int4(w, q, scale, zp)
        raise _unsupported(w, f"target dtype {target}")
    raise _unsupported(w, "this tensor type is not read")


def input_major(w: Tensor) -> QuantizedWeight:
    """``to_input_major(w)``, computed once per parameter and kept on it."""
    cached = getattr(w, _CACHE, None)
    if cached is None:
        with torch.no_grad():
            cached = to_input_major(w)
        setattr(w, _CACHE, cached)
    return cached


def input_major_joined(ws: list[Tensor]) -> QuantizedWeight:
    """Several linears' weights on one input, converted and joined along the outputs
    (``storage.concat_outputs``), computed once per group and kept on the first parameter. The
    parts are converted uncached, so the joined copy is the only one."""
    name = _CACHE + "_joined_" + "_".join(str(id(w)) for w in ws[1:])
    cached = getattr(ws[0], name, None)
    if cached is None:
        with torch.no_grad():
            cached = concat_outputs([getattr(w, _CACHE, None) or to_input_major(w) for w in ws])
        setattr(ws[0], name, cached)
    return cached


def dequantized(w: Tensor) -> Tensor:
    """torchao's own float weight [N, K] (tests compare our storage against it)."""
    return w.dequantize()
