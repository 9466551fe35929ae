"""GPTQ rounding: quantize one input channel at a time and push its error onto the channels not
yet quantized, through the inverse of the input Hessian (Frantar et al., 2022).

Rounding each weight to the nearest code (``rounding="nearest"``) minimises the weight error;
what decoding sees is the output error ``||X W^T - X Q^T||`` over the inputs X the linear gets.
GPTQ minimises that one instead, column by column, with ``H = X^T X / n`` from calibration
tokens: after input channel k is rounded, the remaining columns move by
``-err_k * Hinv[k, k+1:] / Hinv[k, k]`` so that correlated channels absorb the error.

A sparse model's linears do not get X: they get X with the plan's masks applied. Given the
plan, the Hessian is taken over those masked inputs (``input_hessians(..., plan)``), so the error is
placed where the sparse model does not look: channels the plan mostly zeroes weigh little in H
and take the compensation. Such a model is tuned to that plan; with no plan it is tuned to dense
decoding.

All Hessians come from forward passes of the unquantized model (one, or one per chunk of
linears under a memory bound). The paper quantizes block by
block on the inputs of the blocks already quantized; on SmolLM2-135M's int4 that was both worse
and four times slower, so it is not done. The storage is the one ``actsparse.quant.storage``
documents; each group's range is its full range, or the ``clip="mse"`` range weighted by H's
diagonal (see ``gptq_quantize`` for when it is chosen).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .storage import QuantizedWeight, check_options, int4_range, int8_scales, mse_range, pack_int4

#: Diagonal damping, as a fraction of H's mean diagonal: keeps H invertible where channels are
#: dead or masked in every calibration token.
DAMP = 0.01
#: Columns updated together before the deferred update of the rest (speed only, same result).
BLOCK = 128


class _Seen(Exception):
    """Raised by the last hook of a pass: the rest of the forward is not needed."""


def input_hessians(model: nn.Module, linears: dict[str, nn.Linear], tokens: Tensor, plan=None,
                   batch: int = 8) -> dict[str, Tensor]:
    """``X^T X / n`` [K, K] in fp32 of each linear's inputs over ``tokens`` [batch, seq]; with
    ``plan``, of the inputs the plan leaves (its masks applied by ``actsparse.eval.masked``).
    Each batch's forward stops once every linear has seen its input. The matrices live on the
    model's device, one per distinct input: linears called one after the other on the very same
    tensor (q/k/v, gate/up where no mask separates them) share one matrix object."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq] token ids, got shape {tuple(tokens.shape)}")
    param = next(model.parameters(), None)
    if param is not None:
        tokens = tokens.to(param.device)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}  # linear -> the linear whose matrix it shares (itself if none)
    seen: dict[str, str] = {}  # this batch's owners
    last: list = [None, None]  # the previous hook's input tensor and linear (kept alive for the identity test)

    def hook(name):
        def pre(mod, args):
            x_in = args[0]
            if x_in is last[0]:
                seen[name] = seen[last[1]]
            else:
                x = x_in.detach().float().reshape(-1, x_in.shape[-1])
                sums[name] = sums.get(name, 0) + x.t() @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
                seen[name] = name
                last[:] = [x_in, name]
            if len(seen) == len(linears):
                raise _Seen
        return pre

    ctx = contextlib.nullcontext()
    if plan is not None:
        from ..eval.masked import masked

        ctx = masked(model, plan)
    with ctx:  # the plan's pre-hooks are registered first, so ours see the masked inputs
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
        try:
            with torch.no_grad():
                for i in range(0, tokens.shape[0], batch):
                    seen.clear()
                    try:
                        model(tokens[i:i + batch])
                    except _Seen:
                        pass
                    finally:
                        last[:] = [None, None]
                    if owner and seen != owner:
                        raise RuntimeError("the linears' inputs were shared differently from one batch to the next; "
                                           "their Hessians cannot be accumulated")
                    owner = owner or dict(seen)
        finally:
            for h in handles:
                h.remove()
    for n in sums:  # in place: no second copy of every matrix at the peak
        sums[n].div_(counts[n])
    return {n: sums[o] for n, o in owner.items()}


def hessian_chunks(linears: dict[str, nn.Linear], max_bytes: int | None) -> list[list[str]]:
    """The linears split, in order, into runs whose fp32 Hessians (``4 K^2`` bytes each, none
    shared) fit ``max_bytes``; a linear larger than that alone is a run of its own."""
    if max_bytes is None:
        return [list(linears)]
    chunks: list[list[str]] = [[]]
    used = 0
    for name, lin in linears.items():
        size = 4 * lin.in_features ** 2
        if chunks[-1] and used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


def gptq_linears(model: nn.Module, linears: dict[str, nn.Linear], tokens: Tensor, bits: int,
                 group_size: int | None, clip: str = "minmax", act_order: bool = False, plan=None,
                 max_hessian_bytes: int | None = None, progress: bool = False) -> dict[str, QuantizedWeight]:
    """GPTQ's weights of ``linears``, all from the unquantized model (nothing is replaced here).

    The Hessians are taken ``hessian_chunks`` at a time, one forward prefix per chunk, so at most
    ``max_hessian_bytes`` of them live at once (all at once when None): a Llama-3-8B shape holds
    about 1 GB per layer. The result does not depend on the split."""
    from tqdm.auto import tqdm

    out: dict[str, QuantizedWeight] = {}
    with tqdm(total=len(linears), desc=f"GPTQ int{bits}", disable=not progress, leave=False) as bar:
        for chunk in hessian_chunks(linears, max_hessian_bytes):
            hessians = input_hessians(model, {n: linears[n] for n in chunk}, tokens, plan)
            missing = [n for n in chunk if n not in hessians]
            if missing:
                raise ValueError(f"{', '.join(missing[:4])} got no input over tokens= (a linear the forward never "
                                 "calls cannot be fitted)")
            for name in chunk:
                out[name] = gptq_quantize(linears[name].weight, hessians.pop(name), bits, group_size, clip, act_order)
                bar.update()
    return out


def _inverse_cholesky(h: Tensor) -> Tensor:
    """Upper Cholesky factor of ``H^-1`` after damping (the rows GPTQ's updates read)."""
    k = h.shape[0]
    h = h.clone()
    h.diagonal().add_(DAMP * h.diagonal().mean().clamp_min(1e-8))
    for extra in (0.0, 0.1, 1.0):  # more damping if fp32 rounding left H not positive definite
        if extra:
            h.diagonal().add_(extra * h.diagonal().mean())
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise ValueError(f"the input Hessian ({k}x{k}) is not positive definite even after damping")


def gptq_quantize(w: Tensor, hessian: Tensor, bits: int, group_size: int | None = None,
                  clip: str = "minmax", act_order: bool = False) -> QuantizedWeight:
    """Quantize an nn.Linear weight [N, K] with GPTQ against ``hessian`` [K, K] (``X^T X / n``),
    to the same storage as ``quantize_weight`` (int8 per output channel or per group; int4 per
    group with ``clip`` as there, weighted by H's diagonal).

    ``act_order``: round the channels with the largest inputs first (descending H diagonal), so
    their error is spread over the most channels still free; each group's range is then fixed
    beforehand from the original weights ("static groups"), since a group's channels are no
    longer rounded together. Otherwise channels go in order and a group's range is chosen when
    the loop reaches it, from the weights as the earlier updates left them."""
    check_options(bits, group_size)
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {tuple(w.shape)}, got {tuple(hessian.shape)}")
    if bits == 4 and group_size is None:
        raise ValueError("int4 needs a group_size")
    g = group_size or k
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of group_size {g}")
    if bits == 4 and n % 2:
        raise ValueError(f"int4 needs an even number of outputs (two per byte), got {n}")
    dev = w.device
    hessian = hessian.to(dev, torch.float32)
    diag = hessian.diagonal()
    weights = w.detach().float().clone()  # [N, K], updated in place as columns are quantized
    scales = torch.empty(k // g, n, dtype=w.dtype, device=dev)
    offsets = torch.empty(k // g, n, dtype=w.dtype, device=dev) if bits == 4 else None

    def fix_range(grp: int, src: Tensor) -> None:  # src [N, G]: the group's weights
        sc, off = _group_range(src.t()[None], bits, clip, diag[grp * g:(grp + 1) * g], w.dtype)
        scales[grp] = sc[0]
        if offsets is not None:
            offsets[grp] = off[0]

    order = torch.arange(k, device=dev)
    if act_order:
        order = torch.argsort(diag, descending=True, stable=True)
        for grp in range(k // g):
            fix_range(grp, weights[:, grp * g:(grp + 1) * g])
        weights = weights[:, order]
        hessian = hessian[order][:, order]
    u = _inverse_cholesky(hessian)  # in the rounding order
    channel = order.tolist()  # rounding position -> original channel
    codes = torch.empty(k, n, dtype=torch.float32, device=dev)  # by original channel
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        blk = weights[:, b0:b1].clone()
        errs = torch.empty_like(blk)
        for j in range(b1 - b0):
            c = b0 + j
            ch = channel[c]
            if not act_order and c % g == 0:  # a new group: its range from the weights as they are now
                fix_range(c // g, blk[:, j:j + g] if j + g <= b1 - b0 else weights[:, c:c + g])  # int8 per channel: g = K
            col = blk[:, j]
            scf = scales[ch // g].float()
            if bits == 4:
                offf = offsets[ch // g].float()
                q = torch.round((col - offf) / scf).clamp_(0, 15)
                deq = q * scf + offf
            else:
                q = torch.round(col / scf).clamp_(-127, 127)
                deq = q * scf
            codes[ch] = q
            err = (col - deq) / u[c, c]
            blk[:, j:] -= err[:, None] * u[c, c:b1][None, :]
            errs[:, j] = err
        weights[:, b1:] -= errs @ u[b0:b1, b1:]
    if bits == 4:
        return QuantizedWeight(pack_int4(codes), scales.contiguous(), offsets.contiguous(), 4, g, n, k)
    q8 = codes.to(torch.int8).contiguous()
    return QuantizedWeight(q8, (scales if group_size else scales[0]).contiguous(), None, 8, group_size or 0, n, k)


def _group_range(wg: Tensor, bits: int, clip: str, importance: Tensor, dtype: torch.dtype):
    """(scales [1, N], offsets [1, N] or None) of one group ``wg`` [1, G, N], in ``dtype``."""
    if bits == 8:
        return int8_scales(wg, dtype), None
    lo, hi = wg.amin(dim=1), wg.amax(dim=1)
    if clip == "mse":
        lo, hi = mse_range(wg, lo, hi, importance.reshape(1, -1, 1), dtype)
    _, s, o = int4_range(wg, lo, hi, dtype)
    return s, o
