"""Fixed-bin log-spaced histograms: streaming quantiles of site inputs in constant memory.

Thresholds are quantiles of |x|. A histogram with fixed log-spaced bins keeps memory
independent of the number of calibration tokens and gives any quantile to within one bin.
The bins are those of the float32 format itself: the exponent and the top ``mantissa_bits``
bits of the mantissa, i.e. ``2**mantissa_bits`` equal bins per octave (relative width at most
``2**-mantissa_bits``). Binning is then a bit shift and a ``bincount``, much cheaper than
``histc`` on logarithms, which matters: the hooks see every activation.
"""

from __future__ import annotations

import torch


class LogHistogram:
    """Counts of non-negative values in log-spaced bins over ``[2**-octaves, 2**octaves)``.

    Bin 0 holds zeros and everything below the range (treated as zero); values above the
    range go to the last bin.
    """

    def __init__(self, mantissa_bits: int = 7, octaves: int = 48) -> None:
        if not 0 <= mantissa_bits <= 12 or not 1 <= octaves <= 126:
            raise ValueError(f"need 0 <= mantissa_bits <= 12 and 1 <= octaves <= 126, "
                             f"got {mantissa_bits}, {octaves}")
        self.m = mantissa_bits
        self.shift = 23 - mantissa_bits
        self.base = (127 - octaves) << mantissa_bits  # bit pattern >> shift of 2**-octaves
        self.bins = (2 * octaves) << mantissa_bits
        self.counts = torch.zeros(self.bins, dtype=torch.int64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def relative_width(self) -> float:
        """Upper bound of a bin's width relative to its lower edge."""
        return 2.0 ** -self.m

    def _index(self, v: torch.Tensor) -> torch.Tensor:
        idx = (v.view(torch.int32) >> self.shift) - self.base
        return idx.clamp_(0, self.bins - 1)

    def update(self, values: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Add ``|values|`` (times ``scale``, broadcast on the last dim: WINA's ``|x_i| ||W_i||``)."""
        v = values.detach().float().abs()
        if scale is not None:
            v = v * scale.to(v.device).float().abs()
        v = v.contiguous().reshape(-1)
        if v.numel():  # binned where the values are (GPU or CPU), counts kept on the CPU
            self.counts += torch.bincount(self._index(v).long(), minlength=self.bins).cpu()

    def merge(self, other: LogHistogram) -> None:
        if (other.m, other.base, other.bins) != (self.m, self.base, self.bins):
            raise ValueError("cannot merge histograms with different bins")
        self.counts += other.counts

    def edges(self, b: int) -> tuple[float, float]:
        """Value range ``[lo, hi)`` of bin ``b`` (bin 0 starts at 0)."""
        bits = torch.tensor([b + self.base, b + 1 + self.base], dtype=torch.int32) << self.shift
        lo, hi = bits.view(torch.float32).tolist()
        return (0.0 if b == 0 else lo), hi

    def quantile(self, q: float) -> float:
        """The value t with a fraction ``q`` of the data at or below it (linear within a bin)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        cum = torch.cumsum(self.counts, 0)
        total = int(cum[-1])
        if total == 0:
            raise ValueError("empty histogram: no calibration data reached this site")
        target = q * total
        if q == 0.0 or target <= int(cum[0]):
            return 0.0
        b = int(torch.searchsorted(cum.double(), torch.tensor([target], dtype=torch.float64))[0])
        b = min(b, self.bins - 1)
        prev = int(cum[b - 1]) if b > 0 else 0
        lo, hi = self.edges(b)
        frac = (target - prev) / max(int(self.counts[b]), 1)
        return lo + frac * (hi - lo)

    def cdf(self, t: float) -> float:
        """Fraction of the data at or below ``t``: the sparsity of the mask ``|x| > t``."""
        total = self.total
        if total == 0:
            return 0.0
        if t <= 0:
            return int(self.counts[0]) / total if t == 0 else 0.0
        b = int(self._index(torch.tensor([t], dtype=torch.float32))[0])
        lo, hi = self.edges(b)
        frac = min(max((t - lo) / (hi - lo), 0.0), 1.0)
        below = int(self.counts[:b].sum()) + frac * int(self.counts[b])
        return min(below / total, 1.0)
