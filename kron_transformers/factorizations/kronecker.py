"""Sums of Kronecker products: Shapeshifter, word2ketXS, PHM, KPD (seeds 001, 003)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import kpd_matmul, kron_gather_rows, kron_materialize, kron_matmul
from .base import Factorization, register_factorization
from .cost import choose_factored, kron_path_costs
from .decompositions import nearest_kronecker_sum, rearrange, truncated_svd_factors
from .shapes import FactorShapes, validate_factor_shapes
from .weighted import (
    CALIBRATED_TIME_RATIO,
    row_weighted_kronecker_sum,
    weighted_kronecker_sum,
    weighted_kronecker_sum_higher_order,
)


def kronecker_sum_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """``x @ W.T`` by the faster of the factored product and materialize-then-matmul (``cost.choose_factored``)."""
    if factored_is_cheaper(x, factors, rows, cols):
        return kron_matmul(x, factors, rows)
    return F.linear(x, kron_materialize(factors, rows, cols))


def factored_is_cheaper(
    x: torch.Tensor,
    factors: Sequence[torch.Tensor],
    rows: int,
    cols: int,
    cached: torch.Tensor | None = None,
) -> bool:
    """Whether ``kron_matmul`` beats materialize-then-matmul on this input (forward, plus backward if grad flows);
    with ``cached`` (the stored dense ``W``), whether it beats one GEMM on it."""
    return _choose_kronecker(
        "kronecker_sum",
        x,
        factors,
        rows,
        cols,
        lambda inputs, copies: kron_matmul(inputs, copies, rows),
        lambda copies: kron_materialize(copies, rows, cols),
        cached,
    )


def kpd_factored_is_cheaper(
    x: torch.Tensor,
    scale: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    rows: int,
    cached: torch.Tensor | None = None,
) -> bool:
    """``factored_is_cheaper`` for KPD: ``kpd_matmul`` (``S`` folded in) against materialize-then-matmul."""
    return _choose_kronecker(
        "kpd",
        x,
        [scale, a, b],
        rows,
        x.shape[-1],
        lambda inputs, copies: kpd_matmul(inputs, copies[0], copies[1], copies[2], rows),
        lambda copies: kron_materialize([copies[0] * copies[1], copies[2]], rows, x.shape[-1]),
        cached,
    )


def _choose_kronecker(kind, x, factors, rows, cols, run_factored, build, cached) -> bool:
    """``cost.choose_factored`` for a Kronecker sum whose last two ``factors`` are ``(r, a_j, b_j)`` stacks."""
    stacks = factors if kind == "kronecker_sum" else factors[1:]
    factor_shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in stacks)
    rank = int(stacks[0].shape[0])
    tokens = x.numel() // max(cols, 1)
    return choose_factored(
        (kind, factor_shapes, rank, rows, cols, cached is not None),
        lambda backward: kron_path_costs(
            factor_shapes, rank, tokens, rows, cols, x.element_size(), backward, cached is not None
        ),
        run_factored,
        (lambda inputs, copies: F.linear(inputs, build(copies)))
        if cached is None
        else (lambda inputs, copies: F.linear(inputs, cached)),
        x,
        factors,
        cols,
    )


@register_factorization
class KroneckerSum(Factorization):
    """``W = sum_{k=1..r} F_1k ⊗ F_2k ⊗ ... ⊗ F_nk``, each ``F_jk`` of shape ``(a_j, b_j)``.

    Panahi: eq. 3.4 (word2ketXS, order n) and section 4.3 (Shapeshifter, order 2, the
    rank-r factorization of the rearranged matrix). ``prod a_j >= rows``, ``prod b_j >= cols``:
    the padded matrix is cropped. Factors are stored as ``factors[j]`` of shape ``(r, a_j, b_j)``.
    """

    kind = "kronecker_sum"

    def __init__(self, rows: int, cols: int, factor_shapes: FactorShapes, rank: int) -> None:
        super().__init__(rows, cols)
        self.factor_shapes = validate_factor_shapes(factor_shapes, rows, cols, "KroneckerSum")
        if rank < 1:
            raise ValueError(f"KroneckerSum: rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.factors = nn.ParameterList(nn.Parameter(torch.empty(rank, a, b)) for a, b in self.factor_shapes)
        self.reset_random(1.0)
        self._fewer_flops_than_dense = self.matmul_flops_per_row() < rows * cols

    @property
    def order(self) -> int:
        return len(self.factor_shapes)

    def materialize(self) -> torch.Tensor:
        return kron_materialize(list(self.factors), self.rows, self.cols)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kronecker_sum_matmul(x, list(self.factors), self.rows, self.cols)

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return kron_gather_rows(ids, list(self.factors), self.cols)

    def matmul_flops_per_row(self) -> int:
        return int(kron_path_costs(self.factor_shapes, self.rank, 1, self.rows, self.cols, 4, False)[0].flops)

    def factored_beats_dense(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Only a product with fewer multiply-adds than the dense one can win; that one is timed once per shape."""
        return self._fewer_flops_than_dense and factored_is_cheaper(
            x, list(self.factors), self.rows, self.cols, cached=weight
        )

    def structure(self) -> dict[str, Any]:
        return {
            "factorization": self.kind,
            "factor_shapes": [list(shape) for shape in self.factor_shapes],
            "rank": self.rank,
        }

    @torch.no_grad()
    def reset_random(self, std: float) -> None:
        """``F_jk ~ N(0, s^2)`` with ``s = (std^2 / r)^(1 / 2n)``: ``Var(W_il) = r s^(2n) = std^2``."""
        factor_std = (std**2 / self.rank) ** (1.0 / (2 * self.order))
        for factor in self.factors:
            factor.normal_(0.0, factor_std)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> float:
        """Van Loan-Pitsianis: truncated SVD (order 2, optimal) or CP-ALS (order > 2) of ``R(W)``."""
        solution = nearest_kronecker_sum(weight, self.factor_shapes, self.rank)
        for factor, value in zip(self.factors, solution):
            factor.copy_(value.to(factor.dtype))
        return self.relative_error(weight)

    @torch.no_grad()
    def fit_calibrated(
        self, weight: torch.Tensor, second_moment: torch.Tensor, time_ratio: float | None = CALIBRATED_TIME_RATIO
    ) -> tuple[float, float] | None:
        """ALS from the ``svd`` solution, time-capped (``weighted.weighted_kronecker_sum`` and, for order > 2,
        ``weighted_kronecker_sum_higher_order``); None where order > 2 would pass that solver's memory bound."""
        solve = weighted_kronecker_sum if self.order == 2 else weighted_kronecker_sum_higher_order
        result = solve(weight, second_moment, self.factor_shapes, self.rank, time_ratio=time_ratio)
        if result is None:
            return None
        solution, history = result
        for factor, value in zip(self.factors, solution):
            factor.copy_(value.to(factor.dtype))
        return history[0], history[-1]

    @torch.no_grad()
    def fit_row_weighted(self, weight: torch.Tensor, row_weights: torch.Tensor) -> bool:
        """Order 2 (word2ketXS / Shapeshifter embeddings): frequency scaling folded into the factors."""
        if self.order != 2:
            return False
        solution = row_weighted_kronecker_sum(weight, row_weights, self.factor_shapes, self.rank)
        for factor, value in zip(self.factors, solution):
            factor.copy_(value.to(factor.dtype))
        return True


def _divides(size: int, block: int) -> bool:
    return block >= 1 and size % block == 0


@register_factorization
class KPDFactorization(Factorization):
    """``W = sum_{i=1..r} (S ⊙ A_i) ⊗ B_i`` with ``S`` shared across ``i`` (Zhu et al., eq. 3).

    ``S, A_i: (m1, n1)``, ``B_i: (m2, n2)``; ``(m2, n2)`` is the block size, so a zero in ``S``
    zeroes one ``m2 x n2`` block of ``W``. Rows and columns must be multiples of the block.
    """

    kind = "kpd"

    def __init__(self, rows: int, cols: int, block_size: Sequence[int], rank: int) -> None:
        super().__init__(rows, cols)
        block_rows, block_cols = (int(v) for v in block_size)
        if not (_divides(rows, block_rows) and _divides(cols, block_cols)):
            raise ValueError(
                f"KPD: block size {(block_rows, block_cols)} does not tile a {rows}x{cols} weight; "
                f"use a block whose rows divide {rows} and whose columns divide {cols}"
            )
        if rank < 1:
            raise ValueError(f"KPD: rank must be >= 1, got {rank}")
        self.block_size = (block_rows, block_cols)
        self.rank = int(rank)
        grid = (rows // block_rows, cols // block_cols)
        self.s = nn.Parameter(torch.ones(grid))
        self.a = nn.Parameter(torch.empty(rank, *grid))
        self.b = nn.Parameter(torch.empty(rank, block_rows, block_cols))
        self.reset_random(1.0)
        self._fewer_flops_than_dense = self.matmul_flops_per_row() < rows * cols

    @property
    def factor_shapes(self) -> FactorShapes:
        return (tuple(self.s.shape), self.block_size)

    def kronecker_factors(self) -> list[torch.Tensor]:
        """``[S ⊙ A_i, B_i]`` stacked over ``i``: the plain Kronecker-sum factors of ``W``."""
        return [self.s * self.a, self.b]

    def materialize(self) -> torch.Tensor:
        return kron_materialize(self.kronecker_factors(), self.rows, self.cols)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The factored path folds ``S`` into the product (``kpd_matmul``); otherwise materialize-then-matmul."""
        if kpd_factored_is_cheaper(x, self.s, self.a, self.b, self.rows):
            return kpd_matmul(x, self.s, self.a, self.b, self.rows)
        return F.linear(x, self.materialize())

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return kron_gather_rows(ids, self.kronecker_factors(), self.cols)

    def matmul_flops_per_row(self) -> int:
        return int(kron_path_costs(self.factor_shapes, self.rank, 1, self.rows, self.cols, 4, False)[0].flops)

    def factored_beats_dense(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return self._fewer_flops_than_dense and kpd_factored_is_cheaper(
            x, self.s, self.a, self.b, self.rows, cached=weight
        )

    def structure(self) -> dict[str, Any]:
        return {"factorization": self.kind, "block_size": list(self.block_size), "rank": self.rank}

    @torch.no_grad()
    def reset_random(self, std: float) -> None:
        """``S = 1``; ``A, B ~ N(0, s^2)``, ``s = (std^2 / r)^(1/4)`` so ``Var(W) = std^2``."""
        factor_std = (std**2 / self.rank) ** 0.25
        self.s.fill_(1.0)
        self.a.normal_(0.0, factor_std)
        self.b.normal_(0.0, factor_std)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> float:
        """``S = 1`` and the optimal rank-r Kronecker sum (SVD of the block rearrangement)."""
        a, b = truncated_svd_factors(rearrange(weight, self.factor_shapes).to(torch.float64), self.rank)
        self.s.fill_(1.0)
        self.a.copy_(a.reshape(self.rank, *self.s.shape).to(self.a.dtype))
        self.b.copy_(b.reshape(self.rank, *self.block_size).to(self.b.dtype))
        return self.relative_error(weight)

    @torch.no_grad()
    def fit_calibrated(
        self, weight: torch.Tensor, second_moment: torch.Tensor, time_ratio: float | None = CALIBRATED_TIME_RATIO
    ) -> tuple[float, float] | None:
        """``S = 1`` and the weighted Kronecker-sum fit for ``A, B`` (closed form for one-column ``A_i``, else ALS)."""
        (a, b), history = weighted_kronecker_sum(
            weight, second_moment, self.factor_shapes, self.rank, time_ratio=time_ratio
        )
        self.s.fill_(1.0)
        self.a.copy_(a.to(self.a.dtype))
        self.b.copy_(b.to(self.b.dtype))
        return history[0], history[-1]
