"""CETT's per-token samples: sorted |act| and the norms of truncated neuron contributions.

A neuron's contribution to the MLP output is ``n_i = a_i * W_down[:, i]``; per sampled token the
neurons are sorted by |act| once and the norms of the prefix sums of their contributions are
kept, so the CETT of any threshold is a lookup (searchsorted) and budget searches cost no
further model runs.
"""

from __future__ import annotations

import torch

GRID = 1001  # candidate thresholds per MLP: quantiles of |act| in steps of 0.1%


class CettSample:
    """Sorted |act| and prefix-sum norms of dropped contributions for up to ``limit`` tokens."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = int(limit)
        self.seen = 0
        self.a_sorted: list[torch.Tensor] = []  # [r, I] ascending |act|
        self.prefix: list[torch.Tensor] = []  # [r, I + 1] ||sum of the k smallest n_i||, k = 0..I
        self.out_norm: list[torch.Tensor] = []  # [r]
        self._grid: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def rows(self) -> int:
        return sum(x.shape[0] for x in self.a_sorted)

    def add(self, a: torch.Tensor, h: torch.Tensor, y: torch.Tensor, w_in_out: torch.Tensor,
            stride: int = 1) -> None:
        """Add every ``stride``-th token: ``a`` mask scores, ``h`` down input, ``y`` MLP output
        (all ``[tokens, .]``), ``w_in_out`` the down weight as ``[in, out]``."""
        n = a.shape[0]
        idx = torch.arange(n)
        take = idx[(idx + self.seen) % stride == 0][: max(0, self.limit - self.rows)]
        self.seen += n
        if take.numel() == 0:
            return
        a, h, y = a[take].float().abs(), h[take].float(), y[take].float()
        w = w_in_out.float().contiguous()
        buf = torch.empty_like(w)  # one token's contributions, reused: stays in cache
        order = a.argsort(dim=1)
        norms = torch.empty(a.shape[0], a.shape[1] + 1)
        norms[:, 0] = 0.0
        for r in range(a.shape[0]):
            torch.index_select(w, 0, order[r], out=buf)
            buf.mul_(h[r, order[r]].unsqueeze(-1))
            torch.cumsum(buf, 0, out=buf)
            norms[r, 1:] = torch.linalg.vector_norm(buf, dim=-1)
        self.prefix.append(norms)
        self.a_sorted.append(a.gather(1, order))
        self.out_norm.append(y.norm(dim=-1).clamp_min(1e-12))
        self._grid = None

    def error(self, thresholds: torch.Tensor) -> torch.Tensor:
        """Mean CETT over the sampled tokens for each threshold in ``thresholds`` (1-D)."""
        a = torch.cat(self.a_sorted)
        r = torch.cat(self.prefix)
        y = torch.cat(self.out_norm)
        e = thresholds.float().reshape(1, -1).expand(a.shape[0], -1).contiguous()
        dropped = torch.searchsorted(a.contiguous(), e, right=True)  # how many |a| <= e
        return (r.gather(1, dropped) / y.unsqueeze(1)).mean(0)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate thresholds (0 then quantiles of the sampled |act|) and their CETT."""
        if self._grid is None:
            if not self.a_sorted:
                raise ValueError("no CETT samples: no calibration token reached this MLP")
            a = torch.cat(self.a_sorted).reshape(-1)
            if a.numel() > 8_000_000:
                a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[:8_000_000]]
            cand = torch.quantile(a, torch.linspace(0, 1, GRID)).clone()
            cand[0] = 0.0
            cand = torch.cummax(cand, 0).values
            self._grid = (cand, self.error(cand))
        return self._grid

    def threshold(self, budget: float) -> tuple[float, float]:
        """The largest candidate threshold whose CETT, and that of every smaller one, is within
        ``budget``; returns (threshold, its CETT)."""
        cand, err = self.grid()
        over = (err > budget).nonzero()
        k = int(over[0]) - 1 if over.numel() else len(cand) - 1
        k = max(k, 0)
        return float(cand[k]), float(err[k])
