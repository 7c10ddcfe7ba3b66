"""Exact math of every factorization against references built with ``torch.kron`` in float64."""

from __future__ import annotations

import math

import pytest
import torch

from kron_transformers.factorizations import (
    KPDFactorization,
    KroneckerSum,
    LowRankFactorization,
    Word2KetFactorization,
    balanced_factor_shapes,
    build_factorization,
    decompositions,
)
from kron_transformers.factorizations import base as factorization_base
from kron_transformers.factorizations.decompositions import (
    randomized_svd,
    rearrange,
    truncated_svd_factors,
    uses_randomized_svd,
)
from kron_transformers.factorizations.shapes import validate_factor_shapes
from kron_transformers.kernels import kron_gather_rows, kron_materialize, kron_matmul, mixed_radix_digits


@pytest.fixture(autouse=True)
def float64_by_default():
    """References are built in float64; restore the default dtype so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def kron_chain(matrices: list[torch.Tensor]) -> torch.Tensor:
    result = matrices[0]
    for matrix in matrices[1:]:
        result = torch.kron(result, matrix)
    return result


def reference_dense(factorization) -> torch.Tensor:
    """The paper's formula, built independently of the library's own materialize()."""
    rows, cols = factorization.rows, factorization.cols
    if isinstance(factorization, KroneckerSum):
        full = sum(kron_chain([f[k] for f in factorization.factors]) for k in range(factorization.rank))
        return full[:rows, :cols]
    if isinstance(factorization, KPDFactorization):
        s, a, b = factorization.s, factorization.a, factorization.b
        return sum(torch.kron(s * a[i], b[i]) for i in range(factorization.rank))  # Zhu et al., eq. 3
    if isinstance(factorization, LowRankFactorization):
        return factorization.left @ factorization.right
    if isinstance(factorization, Word2KetFactorization):
        table = torch.stack(
            [
                sum(kron_chain([leaf[v, k] for leaf in factorization.leaves]) for k in range(factorization.rank))
                for v in range(rows)
            ]
        )
        return table[:, :cols]
    raise AssertionError(type(factorization))


def randomize(factorization, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in factorization.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return factorization


# name -> constructor of a float64 factorization with rank > 1 on odd (padded) shapes
CASES = {
    "kron2_padded": lambda: KroneckerSum(7, 11, ((2, 3), (4, 4)), rank=3),
    "kron2_exact": lambda: KroneckerSum(12, 15, ((3, 5), (4, 3)), rank=2),
    "kron3_padded": lambda: KroneckerSum(29, 19, ((2, 3), (3, 2), (5, 4)), rank=3),
    "kron4": lambda: KroneckerSum(16, 24, ((2, 2), (2, 3), (2, 2), (2, 2)), rank=2),
    "kpd_rank3": lambda: KPDFactorization(12, 10, (3, 2), rank=3),
    "kpd_rank2_tall": lambda: KPDFactorization(20, 6, (4, 3), rank=2),
    "low_rank": lambda: LowRankFactorization(9, 13, rank=4),
    "word2ket2_padded": lambda: Word2KetFactorization(10, 7, (2, 4), rank=3),
    "word2ket3": lambda: Word2KetFactorization(6, 27, (3, 3, 3), rank=2),
}


@pytest.fixture(params=sorted(CASES))
def factorization(request):
    return randomize(CASES[request.param]().double())


def test_materialize_equals_reference(factorization):
    torch.testing.assert_close(factorization.materialize(), reference_dense(factorization), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_shape", [(5,), (2, 3), (1,), (0,)])
def test_matmul_and_gather_equal_dense(factorization, batch_shape):
    dense = reference_dense(factorization)
    x = torch.randn(*batch_shape, factorization.cols)
    torch.testing.assert_close(factorization.matmul(x), x @ dense.T, rtol=0, atol=1e-10)
    ids = torch.randint(0, factorization.rows, batch_shape)
    torch.testing.assert_close(factorization.gather_rows(ids), dense[ids], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["kron2_padded", "kron3_padded", "kpd_rank3"])
def test_explicit_factored_path_equals_dense(name):
    """The factored kernel itself (not the cost-model choice) matches the dense product."""
    factorization = randomize(CASES[name]().double())
    factors = (
        list(factorization.factors) if isinstance(factorization, KroneckerSum) else factorization.kronecker_factors()
    )
    dense = reference_dense(factorization)
    x = torch.randn(4, factorization.cols)
    torch.testing.assert_close(kron_matmul(x, factors, factorization.rows), x @ dense.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        kron_materialize(factors, factorization.rows, factorization.cols), dense, rtol=0, atol=1e-12
    )
    ids = torch.tensor([0, factorization.rows - 1, 3])
    torch.testing.assert_close(kron_gather_rows(ids, factors, factorization.cols), dense[ids], rtol=0, atol=1e-12)


def test_gradients_equal_autograd_through_dense(factorization):
    x = torch.randn(6, factorization.cols)
    ids = torch.randint(0, factorization.rows, (5,))
    upstream = torch.randn(6, factorization.rows)
    upstream_rows = torch.randn(5, factorization.cols)

    loss = (factorization.matmul(x) * upstream).sum() + (factorization.gather_rows(ids) * upstream_rows).sum()
    structured = torch.autograd.grad(loss, list(factorization.parameters()))
    dense = reference_dense(factorization)
    loss_dense = ((x @ dense.T) * upstream).sum() + (dense[ids] * upstream_rows).sum()
    expected = torch.autograd.grad(loss_dense, list(factorization.parameters()))
    for got, want in zip(structured, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_structure_rebuilds_identical_container(factorization):
    rebuilt = build_factorization(factorization.structure(), factorization.rows, factorization.cols).double()
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in factorization.parameters()]
    rebuilt.load_state_dict(factorization.state_dict())
    torch.testing.assert_close(rebuilt.materialize(), factorization.materialize(), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_random_init_matches_target_std(name):
    torch.manual_seed(0)
    target = 0.02
    stds = []
    for _ in range(20):
        factorization = CASES[name]().double()
        factorization.reset_random(target)
        stds.append(factorization.materialize().detach().std())
    assert abs(float(torch.stack(stds).mean()) / target - 1) < 0.25


# ---------------------------------------------------------------------------------------- svd init


def optimal_relative_error(matrix: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the best rank-r error is the norm of the discarded singular values."""
    singular_values = torch.linalg.svdvals(matrix)
    return float(singular_values[rank:].norm() / singular_values.norm())


def test_rearrangement_is_van_loan_pitsianis():
    a, b = torch.randn(3, 4), torch.randn(5, 2)
    rearranged = rearrange(torch.kron(a, b), ((3, 4), (5, 2)))
    torch.testing.assert_close(rearranged, torch.outer(a.reshape(-1), b.reshape(-1)))


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_kronecker_svd_init_error_is_optimal(rank):
    weight = torch.randn(12, 20)
    shapes = ((3, 4), (4, 5))
    factorization = KroneckerSum(12, 20, shapes, rank).double()
    error = factorization.fit(weight)
    assert error == pytest.approx(optimal_relative_error(rearrange(weight, shapes), rank), rel=1e-9)
    assert error == pytest.approx(factorization.relative_error(weight), rel=1e-12)


def test_kpd_svd_init_error_is_optimal_and_s_is_one():
    weight = torch.randn(12, 10)
    factorization = KPDFactorization(12, 10, (3, 2), rank=3).double()
    error = factorization.fit(weight)
    assert error == pytest.approx(optimal_relative_error(rearrange(weight, ((4, 5), (3, 2))), 3), rel=1e-9)
    assert torch.equal(factorization.s, torch.ones_like(factorization.s))


def test_low_rank_svd_init_error_is_optimal():
    weight = torch.randn(9, 13)
    factorization = LowRankFactorization(9, 13, rank=4).double()
    assert factorization.fit(weight) == pytest.approx(optimal_relative_error(weight, 4), rel=1e-9)


def test_word2ket_order2_fit_is_per_row_optimal():
    weight = torch.randn(6, 12)
    factorization = Word2KetFactorization(6, 12, (3, 4), rank=2).double()
    error = factorization.fit(weight)
    per_row_residual = sum(torch.linalg.svdvals(row.reshape(3, 4))[2:].pow(2).sum() for row in weight)
    assert error == pytest.approx(float(per_row_residual.sqrt() / weight.norm()), rel=1e-9)


@pytest.mark.parametrize(
    "case",
    [
        lambda: KroneckerSum(16, 24, ((2, 3), (4, 2), (2, 4)), rank=2),
        lambda: KroneckerSum(30, 24, ((2, 3), (3, 2), (5, 4)), rank=3),
        lambda: Word2KetFactorization(5, 27, (3, 3, 3), rank=2),
    ],
)
def test_order_n_fit_recovers_planted_factorization(case):
    planted = randomize(case().double(), seed=3)
    target = planted.materialize().detach()
    fitted = case().double()
    assert fitted.fit(target) < 1e-6


def test_padded_fit_is_optimal_for_the_zero_padded_matrix():
    weight = torch.randn(7, 11)
    shapes = ((2, 3), (4, 4))
    factorization = KroneckerSum(7, 11, shapes, rank=2).double()
    error = factorization.fit(weight)
    zero_padded_optimum = optimal_relative_error(rearrange(weight, shapes), 2)
    assert error <= zero_padded_optimum + 1e-12  # cropping only removes error


def test_full_rank_svd_init_reproduces_weight():
    weight = torch.randn(12, 20)
    shapes = ((3, 4), (4, 5))
    factorization = KroneckerSum(12, 20, shapes, rank=12).double()  # min(3*4, 4*5)
    assert factorization.fit(weight) < 1e-12
    torch.testing.assert_close(factorization.materialize(), weight, rtol=0, atol=1e-12)


def test_order3_fit_is_no_worse_than_its_order2_coarsening_bound():
    """A sound order-3 solver at rank r cannot beat the optimal order-2 fit of a coarser grouping."""
    weight = torch.randn(24, 24)
    order3 = KroneckerSum(24, 24, ((2, 2), (3, 3), (4, 4)), rank=4).double()
    error3 = order3.fit(weight)
    bound = optimal_relative_error(rearrange(weight, ((2, 2), (12, 12))), 4)
    assert bound - 1e-9 <= error3 < 1.0


# ---------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "rows, cols, order, expected",
    [
        (768, 768, 2, ((24, 32), (32, 24))),
        (512, 2048, 2, ((16, 64), (32, 32))),
        (3072, 768, 2, ((48, 32), (64, 24))),
    ],
)
def test_balanced_shapes_are_exact_when_possible(rows, cols, order, expected):
    assert balanced_factor_shapes(rows, cols, order) == expected


def test_balanced_shapes_pad_a_prime_vocabulary():
    shapes = balanced_factor_shapes(50257, 768, 2, True, False, 0.1)
    rows = math.prod(a for a, _ in shapes)
    assert 50257 <= rows <= 50257 * 1.02
    assert math.prod(b for _, b in shapes) == 768
    assert max(a for a, _ in shapes) < 400  # not 29 x 1733


def test_factor_shapes_must_cover_the_matrix():
    with pytest.raises(ValueError, match="smaller than the 10x10 weight"):
        validate_factor_shapes(((3, 3), (3, 3)), 10, 10, "layer")


def test_mixed_radix_digits_are_most_significant_first():
    ids = torch.arange(24)
    digits = mixed_radix_digits(ids, (2, 3, 4))
    torch.testing.assert_close(digits[0] * 12 + digits[1] * 4 + digits[2], ids)
    assert digits[0].tolist() == [0] * 12 + [1] * 12


def _decaying_matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A float64 matrix with singular values ``1/k`` (a weight-like, slowly decaying spectrum)."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, cols, dtype=torch.float64, generator=generator)).Q
    return (left / torch.arange(1, cols + 1, dtype=torch.float64)) @ right.T


def test_randomized_svd_is_near_optimal_deterministic_and_leaves_the_global_rng_alone():
    matrix = _decaying_matrix(300, 120, seed=0)
    state = torch.get_rng_state()
    u, s, vh = randomized_svd(matrix, 6)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh), randomized_svd(matrix, 6)))
    exact = torch.linalg.svdvals(matrix)
    torch.testing.assert_close(s, exact[:6], rtol=1e-8, atol=0)
    error = float((matrix - (u * s) @ vh).norm())
    assert error == pytest.approx(float(exact[6:].norm()), rel=1e-8)


def test_only_large_low_rank_problems_take_the_randomized_svd(monkeypatch):
    assert not uses_randomized_svd(torch.empty(1024, 1024), 8)  # below the size threshold: exact
    assert uses_randomized_svd(torch.empty(4096, 1600), 8)
    assert not uses_randomized_svd(torch.empty(4096, 1600), 200)  # rank too large against min(shape)
    assert not uses_randomized_svd(torch.empty(2, 4096, 1600), 8)  # batched problems stay exact
    monkeypatch.setattr(decompositions, "RANDOMIZED_SVD_MIN_ELEMENTS", 300 * 120)
    matrix = _decaying_matrix(300, 120, seed=1)
    left, right = truncated_svd_factors(matrix, 6)
    u, s, vh = randomized_svd(matrix, 6)
    torch.testing.assert_close(left, (u * s.sqrt()).T, rtol=0, atol=0)
    torch.testing.assert_close(right, vh * s.sqrt()[:, None], rtol=0, atol=0)


def test_relative_error_in_row_blocks_equals_the_whole_matrix_formula(monkeypatch):
    monkeypatch.setattr(factorization_base, "RELATIVE_ERROR_BLOCK", 25)  # 2 rows of 13 per block, 5 blocks
    factorization = randomize(KroneckerSum(9, 13, ((3, 13), (3, 1)), rank=2).double(), seed=4)
    weight = torch.randn(9, 13)
    expected = (weight.double() - factorization.materialize().detach()).norm() / weight.double().norm()
    assert factorization.relative_error(weight) == pytest.approx(float(expected), rel=1e-12)
