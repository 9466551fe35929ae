"""Cached-weight index: keep the gathered weight rows of the last decode step, copy only the diff.

An input-sparse linear ``y = (x * mask) @ W^T`` needs only the rows of ``W^T`` whose input
channel is active, so the gather path computes ``x[..., idx] @ Wt[idx]``. Consecutive decode
tokens share most active channels, so re-gathering every active row per token (``index_select``)
copies mostly what the previous token already copied. :class:`WeightRowCache` keeps a compact
buffer of gathered rows plus the row each slot holds, and per step copies only the rows that
became active (NimbleEdge/sparse_transformers' idea; ANCHORS.md, "Weight caching").

Slot policy (per step, all vectorised, no Python loop over rows):

* ``added = new & ~old``, ``removed = old & ~new``.
* Each added row overwrites the slot of a removed row. When more rows leave than arrive, the
  added rows take the *lowest* freed slots, so that the leftover holes are the highest ones.
* Leftover added rows are appended after the live prefix.
* Leftover holes are compacted: with ``m`` live rows after the step, holes at slots ``>= m`` just
  fall off the prefix, and each hole below ``m`` is filled by moving a live row from the tail
  ``[m, n)`` (an in-buffer row copy, counted in the stats). Taking the highest freed slots as
  holes minimises these moves. The buffer prefix ``[:m]`` therefore always holds exactly the
  active rows, so the multiply runs over a compact prefix with no zero padding.

The buffer rows are bit-for-bit copies of the source rows, but slot order is not sorted row
order, so the matmul sums in a different order than ``x[..., mask] @ rows[mask]``: equal to
within the dtype's rounding, not bitwise.

Batch semantics: with a per-sequence mask ``[M, R]`` the cache gathers the *union* of the
rows (a row is present if any sequence needs it) and the x values each sequence does not
select are zeroed, so each sequence's result is exact for its own mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "WeightRowCache",
    "cached_matmul",
    "cached_output_matmul",
    "gather_reference",
    "STAGING_FRACTION",
]

# Scattered row copies go through a reusable staging buffer of this fraction of the capacity
# (at least 64 rows): a fresh temporary per step would be allocated (and for large diffs
# page-faulted) every token. Larger diffs are copied in chunks of the staging size.
STAGING_FRACTION = 8


class WeightRowCache:
    """Compact buffer of the active rows of ``rows [R, C]`` for one site, updated by diff.

    ``rows`` may be any strided view (e.g. ``W.t()``); copying from it is correct but row
    gathers from a column-major view are slow, so callers that care pass an input-major
    contiguous copy (see :meth:`from_weight`). ``capacity`` bounds the buffer
    (``capacity * C * itemsize`` bytes); a step whose mask has more active rows than that
    returns an uncached gather and leaves the cache empty (counted in ``overflows``).
    """

    def __init__(self, rows: Tensor, capacity: int | None = None, *, owns_rows: bool = False):
        if rows.dim() != 2:
            raise ValueError(f"rows must be 2-D [R, C], got shape {tuple(rows.shape)}")
        if not rows.is_floating_point():
            raise TypeError(f"rows must be a float tensor, got {rows.dtype}")
        R, C = rows.shape
        capacity = R if capacity is None else int(capacity)
        if not 0 <= capacity <= R:
            raise ValueError(f"capacity must be in [0, {R}], got {capacity}")
        self.rows = rows
        self.owns_rows = owns_rows  # rows is a copy made for this cache (see source_nbytes)
        self.capacity = capacity
        dev = rows.device
        self.buffer = torch.empty(capacity, C, dtype=rows.dtype, device=dev)
        staging = min(capacity, max(64, capacity // STAGING_FRACTION))
        self._staging = torch.empty(staging, C, dtype=rows.dtype, device=dev)
        self._wide = self._staging_wide = None
        if (C * rows.element_size()) % 16 == 0 and C > 0 and dev.type == "cpu":
            self._wide = self.buffer.view(torch.complex128)
            self._staging_wide = self._staging.view(torch.complex128)
        self.index = torch.empty(capacity, dtype=torch.long, device=dev)  # slot -> row
        self.slot_of = torch.zeros(R, dtype=torch.long, device=dev)  # row -> slot, valid where present
        self.present = torch.zeros(R, dtype=torch.bool, device=dev)
        self._arange = torch.arange(capacity, dtype=torch.long, device=dev)
        self.n = 0
        self.steps = 0
        self.resets = 0
        self.overflows = 0
        self.rows_copied_last = 0  # rows written into the buffer in the last step (incl. moves)
        self.rows_moved_last = 0  # of which compaction moves inside the buffer
        self.rows_copied_total = 0

    @classmethod
    def from_weight(cls, weight: Tensor, capacity: int | None = None, *, input_major: bool = True):
        """Cache for an input-sparse ``F.linear(x, weight)``: rows are the input channels.

        ``input_major=True`` keeps one contiguous ``weight.t()`` copy (R*C*itemsize more memory)
        so each row copy is contiguous; gathering from the strided ``weight.t()`` view is
        correct but an order of magnitude slower on CPU (see benchmarks/index_step.py).
        """
        if input_major:
            return cls(weight.detach().t().contiguous(), capacity, owns_rows=True)
        return cls(weight.detach().t(), capacity)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def buffer_nbytes(self) -> int:
        """The memory bound: capacity * C * itemsize."""
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes this cache allocated for the cache itself: buffer, staging and index vectors
        (not the prepared source copy; see :attr:`source_nbytes`)."""
        ts = (self.buffer, self._staging, self.index, self.slot_of, self.present, self._arange)
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def source_nbytes(self) -> int:
        """Bytes of the prepared input-major copy this cache owns (0 for a caller's view)."""
        return self.rows.numel() * self.rows.element_size() if self.owns_rows else 0

    def reset(self) -> None:
        """Forget the cached rows; the next step copies every active row."""
        if self.n:
            self.present.zero_()
        self.n = 0
        self.resets += 1

    def prefix(self) -> tuple[Tensor, Tensor]:
        """The live buffer prefix and its row index (views, valid until the next step)."""
        return self.buffer[: self.n], self.index[: self.n]

    # ------------------------------------------------------------------ the step
    def _copy_rows(self, dst_slots: Tensor, src: Tensor, src_rows: Tensor) -> None:
        """buffer[dst_slots] = src[src_rows]: gather into the staging buffer, scatter from it.

        The scatter (``index_copy_``) goes through 16-byte-element views when the row size
        allows: torch's CPU scatter is per element, and wide elements make it ~2.5x faster.
        Copies are bitwise (no arithmetic on the viewed values).
        """
        S = self._staging.shape[0]
        total = src_rows.numel()
        for c in range(0, total, S):  # a loop over chunks of rows, usually one
            e = min(c + S, total)
            stage = self._staging[: e - c]
            torch.index_select(src, 0, src_rows[c:e] if total > S else src_rows, out=stage)
            if self._wide is not None:
                dst, stage = self._wide, self._staging_wide[: e - c]
            else:
                dst = self.buffer
            dst.index_copy_(0, dst_slots[c:e] if total > S else dst_slots, stage)

    def step(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Update the cache to the rows where ``mask [R]`` is true.

        Returns ``(buffer_prefix [n, C], index [n])``: slot ``i`` holds ``rows[index[i]]``, and
        ``index`` is exactly the set of true positions of ``mask`` (in slot order), so the caller
        computes ``x[..., index] @ buffer_prefix``. Both are views into the cache, valid until
        the next step or reset.
        """
        if mask.dim() != 1:
            mask = mask.reshape(-1)
        if mask.dtype != torch.bool:
            mask = mask.bool()
        if mask.numel() != self.num_rows:
            raise ValueError(f"mask has {mask.numel()} entries, cache has {self.num_rows} rows")
        self.steps += 1
        added = (mask > self.present).nonzero().view(-1)  # bool >: new & ~old
        removed = (self.present > mask).nonzero().view(-1)
        a, r, n = added.numel(), removed.numel(), self.n
        m = n + a - r
        if m > self.capacity:
            # More active rows than the buffer holds: gather this step uncached, start empty.
            self.reset()
            self.overflows += 1
            idx = mask.nonzero().view(-1)
            self.rows_copied_last = self.rows_moved_last = 0
            self.rows_copied_total += idx.numel()
            return self.rows.index_select(0, idx), idx
        moved = 0
        if r:
            free = self.slot_of.index_select(0, removed)
            if r > a:
                free = free.sort().values  # added rows take the lowest freed slots; holes stay high
        k = min(a, r)
        if k:
            slots = free if k == r else free[:k]
            rows_in = added if k == a else added[:k]
            self._copy_rows(slots, self.rows, rows_in)
            self.index.index_copy_(0, slots, rows_in)
            self.slot_of.index_copy_(0, rows_in, slots)
        if a > r:
            extra = added[k:] if k else added
            torch.index_select(self.rows, 0, extra, out=self.buffer[n:m])
            self.index[n:m] = extra
            self.slot_of.index_copy_(0, extra, self._arange[n:m])
        elif r > a:
            holes = free[k:]
            low = holes[holes < m]
            moved = low.numel()
            if moved:
                # Live rows in the tail [m, n) move down into the holes below m; a tail slot is
                # live iff its row is in the new mask (holes still name their removed row).
                tail = self._arange[m:n]
                src_slots = tail[mask[self.index[m:n]]]
                self._copy_rows(low, self.buffer, src_slots)
                moved_rows = self.index[src_slots]
                self.index.index_copy_(0, low, moved_rows)
                self.slot_of.index_copy_(0, moved_rows, low)
        self.present.copy_(mask)
        self.n = m
        self.rows_copied_last = a + moved
        self.rows_moved_last = moved
        self.rows_copied_total += a + moved
        return self.buffer[:m], self.index[:m]


def _flat(x: Tensor, R: int) -> Tensor:
    if x.shape[-1] != R:
        raise ValueError(f"x has {x.shape[-1]} channels, cache has {R} rows")
    return x.reshape(-1, R)


def cached_matmul(cache: WeightRowCache, x: Tensor, mask: Tensor) -> Tensor:
    """``(x * mask) @ rows`` over the cached compact buffer: x ``[..., R]`` -> ``[..., C]``.

    ``mask [R]`` is shared by all rows of x (masked-out x values are simply not read);
    ``mask [..., R]`` (one per sequence) gathers the union of rows and zeroes each sequence's
    masked-out x values, so every sequence gets its own exact result.
    """
    R = cache.num_rows
    x2 = _flat(x, R)
    if mask.dim() > 1:
        m2 = mask.reshape(-1, R)
        union = m2.any(0)
        x2 = x2 * m2
    else:
        union = mask
    buf, idx = cache.step(union)
    y = torch.mm(x2.index_select(1, idx), buf)
    return y.reshape(*x.shape[:-1], buf.shape[1])


def cached_output_matmul(cache: WeightRowCache, x: Tensor, mask: Tensor) -> Tensor:
    """Output-sparse ``(x @ W^T) * mask`` (e.g. CATS up_proj) with ``cache`` over rows of ``W``.

    ``mask [N]`` or ``[..., N]`` (union gathered, per-sequence outputs zeroed). x ``[..., K]``.
    """
    K = cache.rows.shape[1]
    N = cache.num_rows
    x2 = _flat(x, K)
    m2 = mask.reshape(-1, N) if mask.dim() > 1 else None
    buf, idx = cache.step(m2.any(0) if m2 is not None else mask)
    y = x2.new_zeros(x2.shape[0], N)
    y.index_copy_(1, idx, torch.mm(x2, buf.t()))
    if m2 is not None:
        y = y * m2
    return y.reshape(*x.shape[:-1], N)


def gather_reference(rows: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """Pure-torch reference: ``x[..., mask] @ rows[mask]`` (mask ``[R]``, sorted row order)."""
    return x[..., mask] @ rows[mask]
