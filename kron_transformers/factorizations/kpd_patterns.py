"""KPD pattern selection: one KPD term per candidate block size, summed (Zhu et al., section 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .base import Factorization, register_factorization
from .kronecker import KPDFactorization


@register_factorization
class KPDPatternFactorization(Factorization):
    """``W = sum_k sum_i (S^(k) ⊙ A_i^(k)) ⊗ B_i^(k)``, pattern ``k`` with block size ``block_sizes[k]``.

    Trained with the group penalty of Zhu et al., eq. 7 until one pattern's ``S^(k)`` is all that
    is left non-zero; ``kron_transformers.kpd.finalize_patterns`` then keeps that pattern alone.
    """

    kind = "kpd_patterns"

    def __init__(self, rows: int, cols: int, block_sizes: Sequence[Sequence[int]], rank: int) -> None:
        super().__init__(rows, cols)
        sizes = [tuple(int(v) for v in size) for size in block_sizes]
        if len(sizes) < 2 or len(set(sizes)) != len(sizes):
            raise ValueError(f"KPD pattern selection needs at least two distinct block sizes, got {sizes}")
        self.block_sizes = sizes
        self.rank = int(rank)
        self.patterns = nn.ModuleList(KPDFactorization(rows, cols, size, rank) for size in sizes)

    def materialize(self) -> torch.Tensor:
        return sum(pattern.materialize() for pattern in self.patterns)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return sum(pattern.matmul(x) for pattern in self.patterns)

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return sum(pattern.gather_rows(ids) for pattern in self.patterns)

    def structure(self) -> dict[str, Any]:
        return {"factorization": self.kind, "block_sizes": [list(s) for s in self.block_sizes], "rank": self.rank}

    @torch.no_grad()
    def reset_random(self, std: float) -> None:
        """Each pattern gets ``std / sqrt(K)`` so the sum keeps the target variance."""
        for pattern in self.patterns:
            pattern.reset_random(std / len(self.patterns) ** 0.5)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> float:
        """Greedy: each pattern is the optimal KPD fit of what the previous ones left (residual)."""
        residual = weight.to(torch.float64)
        for pattern in self.patterns:
            pattern.fit(residual)
            residual = residual - pattern.materialize().to(torch.float64)
        return self.relative_error(weight)
