"""The weighted (calibrated-init) solver against dense least-squares references, and its memory bound."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kron_transformers as kt
from kron_transformers.factorizations import KPDFactorization, KroneckerSum, LowRankFactorization, build_factorization
from kron_transformers.factorizations.decompositions import nearest_kronecker_sum
from kron_transformers.factorizations.weighted import (
    kronecker_least_squares,
    weighted_error,
    weighted_kronecker_sum,
    weighted_kronecker_sum_higher_order,
    whitened_low_rank,
)


def second_moment(features: int, seed: int = 0, samples: int = 300) -> torch.Tensor:
    """A correlated, badly scaled ``E[x x^T]`` with one outlier feature (as in transformer activations)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator, dtype=torch.float64)
    x = (x * torch.logspace(0, -1.5, features, dtype=torch.float64)) @ torch.randn(
        features, features, generator=generator, dtype=torch.float64
    )
    x[:, features // 3] *= 20.0
    return x.T @ x / samples


def matrix_root(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def dense_half_step(weight, moment, fixed, free_shape, free_is_first):
    """Least-squares free factor (``A`` when ``free_is_first``, else ``B``) for the other one fixed, from the
    explicit design matrix: column ``(k, i, j)`` is ``vec((E_ij ⊗ B_k) C^(1/2))`` (or ``vec((A_k ⊗ E_ij) C^(1/2))``),
    built with ``torch.kron`` (a test-only, Kronecker-sized operator)."""
    rows, cols = free_shape
    rank = fixed.shape[0]
    root = matrix_root(moment)
    columns = []
    for k in range(rank):
        for i in range(rows):
            for j in range(cols):
                unit = torch.zeros(rows, cols, dtype=torch.float64)
                unit[i, j] = 1.0
                pair = torch.kron(unit, fixed[k]) if free_is_first else torch.kron(fixed[k], unit)
                columns.append((pair @ root).reshape(-1))
    design = torch.stack(columns, 1)
    solution = torch.linalg.lstsq(design, (weight @ root).reshape(-1, 1)).solution
    return solution.reshape(rank, rows, cols)


HALF_STEP_CASES = [(((3, 4), (5, 2)), 3), (((2, 3), (3, 5)), 2), (((4, 2), (3, 2)), 3)]


@pytest.mark.parametrize("shapes, rank", HALF_STEP_CASES)
@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_both_half_steps_equal_the_dense_least_squares_solution(shapes, rank, solver):
    (a1, b1), (a2, b2) = shapes
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(a1 * a2, b1 * b2, generator=generator, dtype=torch.float64)
    moment = second_moment(b1 * b2)
    first = torch.randn(rank, a1, b1, generator=generator, dtype=torch.float64)
    second = torch.randn(rank, a2, b2, generator=generator, dtype=torch.float64)
    problem = kronecker_least_squares(weight, moment, shapes)
    shuffled = problem.shuffled()
    budget = 10**6
    if solver == "cholesky":
        solved_first, error = problem.solve_exact(second, budget)
        solved_second, _ = shuffled.solve_exact(first, budget)
    else:
        dimension = rank * max(b1, b2)
        solved_first, error = problem.solve_iterative(torch.zeros_like(first), second, 4 * dimension, budget)
        solved_second, _ = shuffled.solve_iterative(torch.zeros_like(second), first, 4 * dimension, budget)
    expected_first = dense_half_step(weight, moment, second, shapes[0], free_is_first=True)
    torch.testing.assert_close(solved_first, expected_first, rtol=1e-4, atol=1e-5 * expected_first.abs().max())
    expected_second = dense_half_step(weight, moment, first, shapes[1], free_is_first=False)
    torch.testing.assert_close(solved_second, expected_second, rtol=1e-4, atol=1e-5 * expected_second.abs().max())
    approximation = sum(torch.kron(solved_first[k], second[k]) for k in range(rank))
    assert error == pytest.approx(weighted_error(weight, approximation, moment), rel=1e-6)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("shapes, rank", [(((4, 4), (8, 6)), 2), (((3, 5), (4, 4)), 3), (((2, 2), (6, 8)), 1)])
def test_als_sweeps_never_increase_the_weighted_error_and_beat_svd(shapes, rank, solver):
    (a1, b1), (a2, b2) = shapes
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(a1 * a2 - 1, b1 * b2 - 2, generator=generator, dtype=torch.float64)
    moment = second_moment(weight.shape[1])
    factors, history = weighted_kronecker_sum(weight, moment, shapes, rank, iterations=6, solver=solver)
    assert all(later <= earlier for earlier, later in zip(history, history[1:]))
    assert len(history) > 1 and history[-1] < 0.95 * history[0]
    svd = nearest_kronecker_sum(weight, shapes, rank)
    rows, cols = weight.shape
    cropped = sum(torch.kron(f, s) for f, s in zip(*svd))[:rows, :cols]
    assert history[0] == pytest.approx(weighted_error(weight, cropped, moment), rel=1e-9)
    fitted = sum(torch.kron(f, s) for f, s in zip(*factors))[:rows, :cols]
    assert weighted_error(weight, fitted, moment) == pytest.approx(history[-1], rel=1e-6)


def test_low_rank_is_the_exact_whitened_optimum_for_tall_and_wide_weights():
    for rows, cols in ((23, 9), (9, 23)):
        weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        moment = second_moment(cols)
        left, right = whitened_low_rank(weight, moment, 4)
        singular = torch.linalg.svdvals(weight @ matrix_root(moment))
        optimum = float(singular[4:].norm() / singular.norm())
        assert weighted_error(weight, left @ right, moment) == pytest.approx(optimum, rel=1e-8)


def test_one_column_blocks_are_solved_exactly():
    """KPD with ``1 x N`` blocks (and an ``N x 1`` grid) is a low-rank problem: the closed form is optimal."""
    weight = torch.randn(12, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    moment = second_moment(10)
    (first, second), history = weighted_kronecker_sum(weight, moment, ((6, 1), (2, 10)), 3)
    assert first.shape == (3, 6, 1) and second.shape == (3, 2, 10)
    # (sum_k a_k ⊗ B_k) with a_k a column is U V for W reshaped (6, 2*10) under the weight I_2 ⊗ C
    reshaped = weight.reshape(6, 20)
    singular = torch.linalg.svdvals(reshaped @ torch.block_diag(*[matrix_root(moment)] * 2))
    assert history[-1] == pytest.approx(float(singular[3:].norm() / singular.norm()), rel=1e-8)


ORDER_3 = ((2, 3), (3, 2), (2, 2))


def test_order_3_als_solves_each_factor_by_least_squares_and_beats_cp_als():
    """After one sweep the last factor is the dense least-squares solution given the first two (its digits sit
    in the middle of neither the rows nor the columns, so this checks the digit reordering)."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(12, 12, generator=generator, dtype=torch.float64)
    moment = second_moment(12)
    (f0, f1, f2), history = weighted_kronecker_sum_higher_order(weight, moment, ORDER_3, 2, iterations=1)
    root = matrix_root(moment)
    columns = []
    for k in range(2):
        for p in range(2):
            for q in range(2):
                unit = torch.zeros(2, 2, dtype=torch.float64)
                unit[p, q] = 1.0
                columns.append((torch.kron(torch.kron(f0[k], f1[k]), unit) @ root).reshape(-1))
    design = torch.stack(columns, 1)
    expected = torch.linalg.lstsq(design, (weight @ root).reshape(-1, 1)).solution.reshape(2, 2, 2)
    torch.testing.assert_close(f2, expected, rtol=1e-5, atol=1e-7)
    _, longer = weighted_kronecker_sum_higher_order(weight, moment, ORDER_3, 2, iterations=8)
    assert all(later <= earlier for earlier, later in zip(longer, longer[1:]))
    assert longer[-1] < 0.95 * longer[0]
    svd = nearest_kronecker_sum(weight, ORDER_3, 2)
    approximation = sum(torch.kron(torch.kron(a, b), c) for a, b, c in zip(*svd))
    assert longer[0] == pytest.approx(weighted_error(weight, approximation, moment), rel=1e-6)


def test_order_3_refuses_operands_past_the_memory_bound():
    weight = torch.randn(8, 8, dtype=torch.float64)
    assert weighted_kronecker_sum_higher_order(weight, second_moment(8), ((2, 2), (2, 2), (2, 2)), 64) is None


FACTORIZATIONS = {
    "kronecker_order_3": lambda: KroneckerSum(11, 12, ORDER_3, rank=2),
    "shapeshifter": lambda: KroneckerSum(15, 22, ((3, 4), (5, 6)), rank=3),
    "phm": lambda: KroneckerSum(16, 24, ((4, 4), (4, 6)), rank=4),
    "kpd_2x2": lambda: KPDFactorization(16, 24, (2, 2), rank=3),
    "kpd_eq5": lambda: build_factorization(kt.KPD(rank=2).resolve(16, 24, "linear", "layer"), 16, 24),
    "kpd_1xN": lambda: KPDFactorization(16, 24, (1, 12), rank=3),
    "kpd_Nx1": lambda: KPDFactorization(16, 24, (8, 1), rank=3),
    "low_rank": lambda: LowRankFactorization(16, 24, rank=5),
}


@pytest.mark.parametrize("name", sorted(FACTORIZATIONS))
def test_calibrated_error_is_at_most_the_svd_error_for_every_linear_method(name):
    generator = torch.Generator().manual_seed(5)
    factorization = FACTORIZATIONS[name]().double()
    weight = torch.randn(factorization.rows, factorization.cols, generator=generator, dtype=torch.float64)
    moment = second_moment(factorization.cols)
    factorization.fit(weight)
    svd_error = weighted_error(weight, factorization.materialize().detach(), moment)
    start, end = factorization.fit_calibrated(weight, moment)
    calibrated_error = weighted_error(weight, factorization.materialize().detach(), moment)
    assert calibrated_error == pytest.approx(end, rel=1e-6)
    assert calibrated_error <= svd_error * (1 + 1e-9)
    assert calibrated_error < 0.97 * svd_error


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements any operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.operator = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor) and value.numel() > self.largest:
                self.largest, self.operator = value.numel(), func
        return result


@pytest.mark.parametrize(
    "shapes, rank",
    [
        (((32, 48), (2, 2)), 4),  # KPD 2x2 blocks on a 64x96 weight
        (((16, 1), (4, 96)), 4),  # KPD 4x96 blocks (closed form)
        (((4, 12), (16, 8)), 6),  # Shapeshifter-like
        (((64, 96), (1, 1)), 4),  # 1x1 blocks: the largest rank-times-block Grams
    ],
)
def test_the_solver_never_allocates_more_than_a_few_dense_weights(shapes, rank):
    """No operator output exceeds 4 max(rows cols, cols^2) elements (the dense weight and C)."""
    rows, cols = 64, 96
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(rows, cols, generator=generator)
    moment = second_moment(cols).float()
    with LargestOutput() as recorder:
        _, history = weighted_kronecker_sum(weight, moment, shapes, rank, iterations=3)
    assert history[-1] <= history[0]
    assert recorder.largest <= 4 * max(rows * cols, cols * cols), (recorder.largest, recorder.operator)


def test_the_order_3_solver_never_allocates_more_than_a_few_dense_weights():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(8))
    with LargestOutput() as recorder:
        _, history = weighted_kronecker_sum_higher_order(
            weight, second_moment(96).float(), ((4, 4), (4, 6), (4, 4)), 3, iterations=3
        )
    assert history[-1] < history[0]
    assert recorder.largest <= 4 * max(64 * 96, 96 * 96), (recorder.largest, recorder.operator)
