"""The plain low-rank baseline ``W = U V`` Panahi compares against (section 4.4.3)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Factorization, register_factorization
from .decompositions import truncated_svd_factors
from .weighted import CALIBRATED_TIME_RATIO, row_weighted_low_rank, weighted_error, whitened_low_rank


@register_factorization
class LowRankFactorization(Factorization):
    """``W = left @ right`` with ``left: (rows, r)`` and ``right: (r, cols)``."""

    kind = "low_rank"

    def __init__(self, rows: int, cols: int, rank: int) -> None:
        super().__init__(rows, cols)
        if not 1 <= rank <= min(rows, cols):
            raise ValueError(f"LowRank: rank must be in [1, {min(rows, cols)}] for a {rows}x{cols} weight, got {rank}")
        self.rank = int(rank)
        self.left = nn.Parameter(torch.empty(rows, rank))
        self.right = nn.Parameter(torch.empty(rank, cols))
        self.reset_random(1.0)

    def materialize(self) -> torch.Tensor:
        return self.left @ self.right

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.right), self.left)

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.left[ids] @ self.right

    def matmul_flops_per_row(self) -> int:
        return self.rank * (self.rows + self.cols)

    def structure(self) -> dict[str, Any]:
        return {"factorization": self.kind, "rank": self.rank}

    @torch.no_grad()
    def reset_random(self, std: float) -> None:
        """Both factors ``N(0, s^2)`` with ``s = (std^2 / r)^(1/4)``, so ``Var(W) = std^2``."""
        factor_std = (std**2 / self.rank) ** 0.25
        self.left.normal_(0.0, factor_std)
        self.right.normal_(0.0, factor_std)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> float:
        """Truncated SVD (Eckart-Young optimal)."""
        left, right = truncated_svd_factors(weight.to(torch.float64), self.rank)
        self.left.copy_(left.T.to(self.left.dtype))
        self.right.copy_(right.to(self.right.dtype))
        return self.relative_error(weight)

    @torch.no_grad()
    def fit_calibrated(
        self, weight: torch.Tensor, second_moment: torch.Tensor, time_ratio: float | None = CALIBRATED_TIME_RATIO
    ) -> tuple[float, float] | None:
        """Exact: SVD of ``W C^(1/2)`` mapped back by ``C^(-1/2)`` (no refinement: ``time_ratio`` unused)."""
        left, right = whitened_low_rank(weight, second_moment, self.rank)
        self.left.copy_(left.to(self.left.dtype))
        self.right.copy_(right.to(self.right.dtype))
        error = weighted_error(weight, self.materialize(), second_moment)
        return error, error

    @torch.no_grad()
    def fit_row_weighted(self, weight: torch.Tensor, row_weights: torch.Tensor) -> bool:
        """Exact: SVD of the frequency-scaled rows."""
        left, right = row_weighted_low_rank(weight, row_weights, self.rank)
        self.left.copy_(left.to(self.left.dtype))
        self.right.copy_(right.to(self.right.dtype))
        return True
