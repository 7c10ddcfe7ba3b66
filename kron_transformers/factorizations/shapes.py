"""Factor-shape selection and mixed-radix digits for Kronecker factorizations.

A matrix ``W`` of shape ``(rows, cols)`` written as ``sum_k F_1k ⊗ ... ⊗ F_nk`` with
``F_jk`` of shape ``(a_j, b_j)`` needs ``prod a_j >= rows`` and ``prod b_j >= cols``
(ARCHITECTURE.md, "The math"; the matrix is zero-padded, then cropped). It costs
``r * sum_j a_j b_j`` parameters.
"""

from __future__ import annotations

import math
from functools import lru_cache


FactorShapes = tuple[tuple[int, int], ...]

# Padding allowed on a dimension that cannot be factored well (e.g. a prime vocabulary
# size): the padded size may exceed the true size by at most this fraction.
DEFAULT_PADDING_TOLERANCE = 0.02
# Vocabulary sides may be padded more: padded rows of an embedding are never gathered.
VOCAB_PADDING_TOLERANCE = 0.1


def _exact_factorizations(size: int, order: int, minimum: int = 1) -> list[tuple[int, ...]]:
    """All non-decreasing tuples of ``order`` integers >= ``minimum`` whose product is ``size``."""
    if order == 1:
        return [(size,)] if size >= minimum else []
    result = []
    factor = minimum
    while factor**order <= size:
        if size % factor == 0:
            for rest in _exact_factorizations(size // factor, order - 1, factor):
                result.append((factor,) + rest)
        factor += 1
    return result


def _padded_factorizations(size: int, order: int, tolerance: float) -> list[tuple[int, ...]]:
    """Non-decreasing tuples whose product is in ``[size, limit]``.

    ``limit`` is ``size * (1 + tolerance)``, widened for small sizes to ``size + 2 * size^(1/order)``
    so a small prime dimension (7, 11) can still be padded to a balanced grid.

    Only near-balanced candidates are generated: ``order - 1`` equal factors ``t`` and a last
    factor ``ceil(size / t^(order-1))``, for ``t`` around the ``order``-th root, and, for
    order 2, every first factor (the set is small for the sizes that occur in practice).
    """
    limit = max(size * (1.0 + tolerance), size + 2 * math.ceil(size ** (1.0 / order)))
    candidates: set[tuple[int, ...]] = set()
    if order == 2:
        for first in range(1, math.isqrt(size) + 2):
            second = -(-size // first)
            if first * second <= limit:
                candidates.add(tuple(sorted((first, second))))
    else:
        root = size ** (1.0 / order)
        for base in range(max(1, int(root) - 2), int(root) + 3):
            last = -(-size // base ** (order - 1))
            shape = tuple(sorted((base,) * (order - 1) + (last,)))
            if math.prod(shape) <= limit:
                candidates.add(shape)
    return sorted(candidates)


@lru_cache(maxsize=1024)
def side_candidates(size: int, order: int, allow_padding: bool, tolerance: float) -> tuple[tuple[int, ...], ...]:
    """Candidate factor sizes (non-decreasing tuples) for one side of the matrix."""
    if size < 1 or order < 1:
        raise ValueError(f"cannot factor a dimension of size {size} into {order} factors")
    candidates = set(_exact_factorizations(size, order))
    if allow_padding:
        candidates.update(_padded_factorizations(size, order, tolerance))
    return tuple(sorted(candidates))


def _side_score(factors: tuple[int, ...], size: int) -> float:
    """Imbalance beyond a factor of 2 (``log(max/min) - log 2``) plus ``30 log(padded/size)`` for padding.

    Exact factorizations within a factor 2 of each other (512 = 16 x 32) are preferred to any
    padding; badly unbalanced ones (50257 = 29 x 1733) lose to a slightly padded square grid.
    """
    imbalance = max(0.0, math.log(max(factors) / min(factors)) - math.log(2.0))
    return imbalance + 30.0 * math.log(math.prod(factors) / size)


@lru_cache(maxsize=1024)
def balanced_factor_shapes(
    rows: int,
    cols: int,
    order: int,
    pad_rows: bool = True,
    pad_cols: bool = True,
    tolerance: float = DEFAULT_PADDING_TOLERANCE,
) -> FactorShapes:
    """Factor shapes ``((a_1, b_1), ..., (a_n, b_n))``, ``a_j ~ rows^(1/n)`` and ``b_j ~ cols^(1/n)``.

    Each side is split into its most balanced factorization (exact, or padded by at most
    ``tolerance`` where allowed and better balanced); the ``a`` are then sorted ascending and
    the ``b`` descending, which minimizes ``sum_j a_j b_j`` (rearrangement inequality). Balanced
    sides matter: ``(1 x m) ⊗ (n x 1)`` has the same parameter count but is only a rank-1 outer
    product, while ``sqrt(n) x sqrt(m)`` factors are Shapeshifter's (Panahi, section 4.3).
    """
    row_factors = balanced_factors(rows, order, pad_rows, tolerance)
    col_factors = balanced_factors(cols, order, pad_cols, tolerance)
    return tuple(zip(row_factors, reversed(col_factors)))


def balanced_factors(
    size: int, order: int, allow_padding: bool = False, tolerance: float = DEFAULT_PADDING_TOLERANCE
) -> tuple[int, ...]:
    """The most balanced ``order`` factors (ascending) of ``size``, or of a slightly larger size if allowed."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    return min(side_candidates(size, order, allow_padding, tolerance), key=lambda f: _side_score(f, size))


def validate_factor_shapes(factor_shapes: FactorShapes, rows: int, cols: int, owner: str) -> FactorShapes:
    """Check user-given factor shapes cover a ``rows x cols`` matrix; return them as tuples."""
    try:
        shapes = tuple((int(a), int(b)) for a, b in factor_shapes)
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner}: factor_shapes must be a sequence of (rows, cols) pairs, got {factor_shapes!r}"
        ) from None
    if len(shapes) < 2:
        raise ValueError(f"{owner}: need at least 2 factor shapes, got {shapes}")
    if any(a < 1 or b < 1 for a, b in shapes):
        raise ValueError(f"{owner}: factor shapes must be positive, got {shapes}")
    prod_rows = math.prod(a for a, _ in shapes)
    prod_cols = math.prod(b for _, b in shapes)
    if prod_rows < rows or prod_cols < cols:
        raise ValueError(
            f"{owner}: factor shapes {shapes} cover a {prod_rows}x{prod_cols} matrix, smaller than the "
            f"{rows}x{cols} weight; the products of the factor rows and columns must be >= {rows} and >= {cols}"
        )
    return shapes


def max_kronecker_rank(factor_shapes: FactorShapes) -> int:
    """Largest useful rank: the rank of the rearranged matrix (order 2) or tensor bound (order n).

    For order 2 the rearrangement ``R(W)`` is ``(a_1 b_1) x (a_2 b_2)`` (Van Loan-Pitsianis), so
    rank ``min(a_1 b_1, a_2 b_2)`` represents any matrix; for order n the generic CP-rank bound
    ``prod_j(a_j b_j) / max_j(a_j b_j)`` plays the same role.
    """
    sizes = [a * b for a, b in factor_shapes]
    return math.prod(sizes) // max(sizes)
