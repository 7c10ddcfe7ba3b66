"""Activation-aware ("calibrated") initialization: minimize ``||(W - W_hat) C^(1/2)||_F`` for the layer's
input second moment ``C = E[x x^T]`` instead of ``||W - W_hat||_F``.

- Low rank: exact. With ``M = W C^(1/2)``, the best rank-r ``M_r`` (SVD) gives ``W_hat = M_r C^(-1/2)``
  (the whitening used by activation-aware SVD methods).
- Order-2 Kronecker sums (Shapeshifter, PHM, KPD): ``C`` is approximated by its nearest Kronecker product
  ``C1 ⊗ C2`` (K-FAC); since ``(A ⊗ B)(C1^(1/2) ⊗ C2^(1/2)) = (A C1^(1/2)) ⊗ (B C2^(1/2))`` the weighted problem
  becomes the unweighted nearest-Kronecker-sum problem (rearranged SVD). That start is refined against the
  full ``C`` by alternating least squares: with ``B`` fixed the error is quadratic in ``A`` and all rows
  share one Gram matrix, so each half-step is one damped linear solve; ALS never increases the error.
All of it in float64, with damping ``epsilon * mean(diag C)`` so singular or dead inputs give no NaN.
"""

from __future__ import annotations

import torch

from ..kernels import kron_materialize
from .decompositions import nearest_kronecker_sum, rearrange, truncated_svd_factors


DAMPING = 1e-6


def _damped(matrix: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    scale = matrix.diagonal().mean().clamp_min(1e-30)
    return matrix + damping * scale * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)


def _psd_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(_damped(matrix))
    values = values.clamp_min(values.max() * 1e-12)
    return (vectors * values.pow(power)) @ vectors.T


def weighted_error(weight: torch.Tensor, approximation: torch.Tensor, second_moment: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr(D C D^T) / tr(W C W^T))`` with ``D = W - W_hat``."""
    difference = (weight - approximation).to(torch.float64)
    weight = weight.to(torch.float64)
    numerator = torch.einsum("ij,jk,ik->", difference, second_moment, difference)
    denominator = torch.einsum("ij,jk,ik->", weight, second_moment, weight).clamp_min(1e-300)
    return float((numerator.clamp_min(0) / denominator).sqrt())


def whitened_low_rank(
    weight: torch.Tensor, second_moment: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right`` minimizing ``||(W - left right) C^(1/2)||_F`` exactly."""
    weight = weight.to(torch.float64)
    root = _psd_power(second_moment, 0.5)
    inverse_root = _psd_power(second_moment, -0.5)
    left, right = truncated_svd_factors(weight @ root, rank)  # (r, rows), (r, cols)
    return left.T, right @ inverse_root


def nearest_kronecker_product(matrix: torch.Tensor, first: int, second: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PSD ``C1 (first x first)`` and ``C2 (second x second)`` with ``C ≈ C1 ⊗ C2`` (rank-1 VLP of ``C``)."""
    left, right = truncated_svd_factors(rearrange(matrix, ((first, first), (second, second))), 1)
    c1, c2 = left[0].reshape(first, first), right[0].reshape(second, second)
    sign = torch.sign(c1.trace()) if c1.trace() != 0 else 1.0
    c1, c2 = sign * c1, sign * c2
    return (c1 + c1.T) / 2, (c2 + c2.T) / 2


def _solve_first(weight_c, second_moment, second, shapes):
    """Least-squares ``A`` (r, a1, b1) for fixed ``B``: Gram ``H[kj, KJ] = sum_i B_k[i] C_jJ B_K[i]^T``."""
    (a1, b1), (a2, b2) = shapes
    rank = second.shape[0]
    blocks = second_moment.reshape(b1, b2, b1, b2)
    pair = torch.einsum("kil,KiL->kKlL", second, second)  # contract the rows first: r^2 b2^2 a2
    gram = torch.einsum("kKlL,jlJL->kjKJ", pair, blocks).reshape(rank * b1, rank * b1)
    rhs = torch.einsum("kil,aijl->kja", second, weight_c.reshape(a1, a2, b1, b2)).reshape(rank * b1, a1)
    solution = torch.linalg.solve(_damped(gram), rhs)  # (r*b1, a1)
    return solution.reshape(rank, b1, a1).transpose(1, 2)


def _solve_second(weight_c, second_moment, first, shapes):
    """Least-squares ``B`` (r, a2, b2) for fixed ``A``: Gram ``H[kl, KL] = sum_i A_k[i] C_(.l)(.L) A_K[i]^T``."""
    (a1, b1), (a2, b2) = shapes
    rank = first.shape[0]
    blocks = second_moment.reshape(b1, b2, b1, b2)
    pair = torch.einsum("kij,KiJ->kKjJ", first, first)
    gram = torch.einsum("kKjJ,jlJL->klKL", pair, blocks).reshape(rank * b2, rank * b2)
    rhs = torch.einsum("kij,iajl->kla", first, weight_c.reshape(a1, a2, b1, b2)).reshape(rank * b2, a2)
    solution = torch.linalg.solve(_damped(gram), rhs)  # (r*b2, a2)
    return solution.reshape(rank, b2, a2).transpose(1, 2)


def weighted_kronecker_sum(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    factor_shapes,
    rank: int,
    iterations: int = 10,
    tolerance: float = 1e-4,
) -> tuple[list[torch.Tensor], list[float]]:
    """Order-2 factors ``[A (r, a1, b1), B (r, a2, b2)]`` for the weighted problem, and the error history.

    ``history[0]`` is the K-FAC start's weighted error, then one entry per ALS sweep (non-increasing
    up to the damping); sweeps stop early when one improves the error by less than ``tolerance``
    (relative). ``weight`` is ``(rows, cols)`` and ``second_moment`` is ``(cols, cols)``; both are
    zero-padded to the factor grid, the padded inputs being always zero.
    """

    (a1, b1), (a2, b2) = factor_shapes
    rows, cols = weight.shape
    padded_weight = weight.to(torch.float64).new_zeros(a1 * a2, b1 * b2)
    padded_weight[:rows, :cols] = weight.to(torch.float64)
    padded_moment = second_moment.to(torch.float64).new_zeros(b1 * b2, b1 * b2)
    padded_moment[:cols, :cols] = second_moment.to(torch.float64)

    c1, c2 = nearest_kronecker_product(padded_moment, b1, b2)
    root1, root2 = _psd_power(c1, 0.5), _psd_power(c2, 0.5)
    whitened = rearrange(padded_weight @ torch.kron(root1, root2), factor_shapes)
    left, right = truncated_svd_factors(whitened, rank)
    first = left.reshape(rank, a1, b1) @ _psd_power(c1, -0.5)
    second = right.reshape(rank, a2, b2) @ _psd_power(c2, -0.5)

    def error(factors):
        return weighted_error(padded_weight, kron_materialize(factors, a1 * a2, b1 * b2), padded_moment)

    history = [error([first, second])]
    weight_c = padded_weight @ padded_moment
    for _ in range(iterations):
        first = _solve_first(weight_c, padded_moment, second, factor_shapes)
        second = _solve_second(weight_c, padded_moment, first, factor_shapes)
        history.append(error([first, second]))
        if history[-2] - history[-1] < tolerance * history[-2]:
            break
    return [first, second], history


def row_weighted_error(weight: torch.Tensor, approximation: torch.Tensor, row_weights: torch.Tensor) -> float:
    """``sqrt(sum_v f_v ||E_v - E_hat_v||^2 / sum_v f_v ||E_v||^2)``: embedding error weighted by token frequency."""
    difference = (weight - approximation).to(torch.float64).pow(2).sum(1)
    total = (weight.to(torch.float64).pow(2).sum(1) * row_weights).sum().clamp_min(1e-300)
    return float(((difference * row_weights).sum() / total).sqrt())


def _row_scale(row_weights: torch.Tensor) -> torch.Tensor:
    """``sqrt(f + damping)``: never-seen tokens keep a small weight, so their rows stay defined."""
    return (row_weights + DAMPING * row_weights.mean().clamp_min(1e-30) + 1e-30).sqrt()


def row_weighted_low_rank(weight: torch.Tensor, row_weights: torch.Tensor, rank: int):
    """Exact minimizer of ``||diag(f)^(1/2) (E - U V)||_F``: SVD of the scaled rows, then unscale ``U``."""
    scale = _row_scale(row_weights.to(torch.float64))
    left, right = truncated_svd_factors(weight.to(torch.float64) * scale[:, None], rank)
    return left.T / scale[:, None], right


def row_weighted_kronecker_sum(weight: torch.Tensor, row_weights: torch.Tensor, factor_shapes, rank: int):
    """Order-2 start for ``||diag(f)^(1/2)(E - sum_k A_k ⊗ B_k)||``: ``f`` (reshaped ``a1 x a2``) is replaced by its
    nearest rank-1 product ``f1 f2^T``, so ``diag(f) ≈ diag(f1) ⊗ diag(f2)`` and the scaling moves into the
    factors (the row-side analogue of the K-FAC start); exact when token frequencies factor over the digits."""
    (a1, _), (a2, _) = factor_shapes
    weights = row_weights.to(torch.float64).new_zeros(a1 * a2)
    weights[: row_weights.shape[0]] = row_weights.to(torch.float64)
    first, second = truncated_svd_factors(weights.reshape(a1, a2), 1)
    f1, f2 = first[0].abs(), second[0].abs()
    s1, s2 = _row_scale(f1), _row_scale(f2)
    padded = weight.to(torch.float64).new_zeros(a1 * a2, weight.shape[1])
    padded[: weight.shape[0]] = weight.to(torch.float64)
    scaled = padded * torch.kron(s1, s2)[:, None]
    left, right = nearest_kronecker_sum(scaled, factor_shapes, rank)
    return [left / s1[None, :, None], right / s2[None, :, None]]
