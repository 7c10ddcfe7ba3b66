"""Activation-aware ("calibrated") initialization and distillation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, make_inputs
from torch import nn

import kron_transformers as kt
from kron_transformers.factorizations.weighted import weighted_error, weighted_kronecker_sum


def correlated_inputs(features: int, rows: int = 400, seed: int = 0) -> torch.Tensor:
    """Strongly non-white inputs: mixed, with a decaying spectrum and one dead feature."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator)
    scales = torch.logspace(0, -2, features)
    x = (torch.randn(rows, features, generator=generator) * scales) @ mixing
    x[:, -1] = 0.0  # a dead input: C is singular
    return x


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 24))


METHODS = {
    "shapeshifter": kt.Shapeshifter(rank=2),
    "kronecker": kt.Kronecker(rank=2, factor_shapes=[[4, 4], [8, 6]]),
    "phm": kt.PHM(n=4),
    "kpd": kt.KPD(rank=2, block_size=(4, 4)),
    "low_rank": kt.LowRank(rank=3),
}


def compress_mlp(method: str, init: str, x: torch.Tensor) -> nn.Module:
    config = kt.KronConfig(default=METHODS[method], target_modules=["0"], init=init)
    return kt.compress_model(mlp(), config, calibration_data=[{"input": x}] if init == "calibrated" else None)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_calibrated_has_lower_output_error_than_svd(method):
    x = correlated_inputs(24)
    dense = mlp()
    with torch.no_grad():
        target = dense[0](x)
    errors = {}
    for init in ("svd", "calibrated"):
        model = compress_mlp(method, init, x)
        with torch.no_grad():
            errors[init] = float((model[0](x) - target).norm() / (target - dense[0].bias).norm())
        entry = kt.applied_config(model).modules["0"]
        assert entry["init"] == init
        if init == "calibrated":
            assert entry["output_error"] == pytest.approx(errors[init], rel=1e-4)
            assert not torch.isnan(model[0].weight).any()
    assert errors["calibrated"] < errors["svd"]


def matrix_root(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


@pytest.mark.parametrize("bias", [False, True])
def test_calibrated_low_rank_is_the_exact_optimum(bias):
    """Rank 3, inputs with a non-zero mean mu. Without a bias: the optimum of ||(W - W_hat) C^(1/2)||. With one:
    the optimum over W_hat and a free bias, W_hat from W (C - mu mu^T)^(1/2) and b' = b + (W - W_hat) mu; the
    reported error is the layer's measured output error, below the bias-free optimum."""
    x = correlated_inputs(24).double() + torch.linspace(-2, 3, 24, dtype=torch.float64)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(24, 32, bias=bias)).double()
    model = kt.compress_model(
        copy.deepcopy(dense),
        kt.KronConfig(default=kt.LowRank(rank=3), target_modules=["0"], init="calibrated"),
        calibration_data=[{"input": x}],
    )
    weight = dense[0].weight.detach()
    second_moment, mean = x.T @ x / x.shape[0], x.mean(0)
    scale = (weight @ matrix_root(second_moment)).norm()
    uncentred = float(torch.linalg.svdvals(weight @ matrix_root(second_moment))[3:].norm() / scale)
    centred = float(
        torch.linalg.svdvals(weight @ matrix_root(second_moment - torch.outer(mean, mean)))[3:].norm() / scale
    )
    reported = kt.applied_config(model).modules["0"]["output_error"]
    with torch.no_grad():
        measured = float((model[0](x) - dense[0](x)).norm() / (x @ weight.T).norm())
    assert reported == pytest.approx(measured, rel=1e-6)
    assert reported == pytest.approx(centred if bias else uncentred, rel=1e-4, abs=1e-6)
    if bias:
        assert centred < 0.9 * uncentred
        shift = (weight - model[0].weight.detach()) @ mean
        torch.testing.assert_close(model[0].bias.detach(), dense[0].bias.detach() + shift)


@pytest.mark.parametrize("shapes, rank", [(((4, 4), (8, 6)), 2), (((3, 5), (4, 4)), 3), (((2, 2), (6, 8)), 1)])
def test_als_refinement_never_increases_the_weighted_error(shapes, rank):
    x = correlated_inputs(shapes[0][1] * shapes[1][1]).double()
    weight = torch.randn(shapes[0][0] * shapes[1][0], x.shape[1], dtype=torch.float64)
    _, history = weighted_kronecker_sum(weight, x.T @ x / len(x), shapes, rank, iterations=15)
    assert all(later <= earlier + 1e-9 for earlier, later in zip(history, history[1:]))
    assert history[-1] < history[0]


def test_weighted_error_is_the_relative_output_error():
    x = correlated_inputs(10).double()
    weight, approximation = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    expected = (x @ (weight - approximation).T).norm() / (x @ weight.T).norm()
    assert weighted_error(weight, approximation, x.T @ x) == pytest.approx(float(expected), rel=1e-10)


def test_calibrate_collects_every_linear_and_removes_its_hooks():
    model = build_model("bert")
    batches = [{"input_ids": make_inputs("bert", seed)["input_ids"]} for seed in range(3)]
    stats = kt.calibrate(model, batches)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= set(stats.second_moments)
    assert all(not m._forward_hooks for m in model.modules())
    c = stats.second_moment("bert.encoder.layer.0.attention.self.query")
    assert c.dtype == torch.float64 and torch.allclose(c, c.T)
    assert stats.rows_seen["bert.encoder.layer.0.attention.self.query"] == 3 * 3 * 7


@pytest.mark.parametrize("ratio", [None, 0.5])
def test_calibration_time_ratio_reaches_the_weighted_solver_and_the_saved_config(monkeypatch, ratio):
    import kron_transformers.factorizations.kronecker as kronecker

    seen = []
    solver = kronecker.weighted_kronecker_sum

    def spy(*args, **kwargs):
        seen.append(kwargs["time_ratio"])
        return solver(*args, **kwargs)

    monkeypatch.setattr(kronecker, "weighted_kronecker_sum", spy)
    model = build_model("bert")
    batches = [{"input_ids": make_inputs("bert", seed)["input_ids"]} for seed in range(2)]
    config = kt.KronConfig(attention=kt.Shapeshifter(rank=2), init="calibrated", calibration_time_ratio=ratio)
    kt.compress_model(model, config, calibration_data=batches)
    assert seen and set(seen) == {ratio}
    saved = kt.KronConfig.from_dict(model.config.quantization_config.to_dict())
    assert saved.calibration_time_ratio == ratio


def test_second_moment_in_the_solve_precision_is_the_float64_moment_rounded_once(monkeypatch):
    """``second_moment(name, float32)`` divides in float64 chunk by chunk and rounds once: the same numbers as
    rounding the float64 moment, without a second float64 copy; ``discard`` frees a layer's sums."""
    import kron_transformers.calibration as calibration

    monkeypatch.setattr(calibration, "MOMENT_CHUNK_ROWS", 5)  # several chunks, the last one short
    stats = kt.CalibrationStats()
    inputs = torch.randn(50, 13, dtype=torch.float64) * 3 + 1
    stats.second_moments["layer"], stats.rows_seen["layer"] = inputs.T @ inputs, 50
    stats.first_moments["layer"] = inputs.sum(0)
    reference = stats.second_moments["layer"] / 50
    assert torch.equal(stats.second_moment("layer"), reference)
    rounded = stats.second_moment("layer", torch.float32)
    assert rounded.dtype == torch.float32 and torch.equal(rounded, reference.float())
    stats.discard("layer")
    assert stats.second_moment("layer") is None and stats.mean("layer") is None and not stats.rows_seen


def test_calibrated_compression_of_a_transformer_reports_output_errors_for_every_order():
    model = build_model("bert")
    batches = [{"input_ids": make_inputs("bert", seed)["input_ids"]} for seed in range(3)]
    stats = kt.calibrate(model, batches)
    config = kt.KronConfig(
        embedding=kt.Word2KetXS(rank=4),
        attention=kt.Shapeshifter(rank=2),
        ffn=kt.Kronecker(order=3, rank=2),
        init="calibrated",
    )
    kt.compress_model(model, config, calibration_data=stats)
    modules = kt.applied_config(model).modules
    assert modules["bert.encoder.layer.0.attention.self.query"]["init"] == "calibrated"
    assert modules["bert.embeddings.word_embeddings"]["init"] == "calibrated (token frequency)"
    assert modules["bert.encoder.layer.0.intermediate.dense"]["init"] == "calibrated"  # order 3: ALS per factor
    report = kt.report(model)
    assert "output error" in str(report)
    assert all(row.output_error is not None for row in report.modules)


def test_calibrated_without_data_is_refused():
    with pytest.raises(ValueError, match="needs calibration_data="):
        kt.compress_model(mlp(), kt.KronConfig(default=kt.LowRank(rank=2), target_modules=["0"], init="calibrated"))


def test_distillation_brings_the_student_closer_to_the_teacher():
    teacher = build_model("bert")
    student = kt.compress_model(
        copy.deepcopy(teacher), kt.KronConfig(attention=kt.Shapeshifter(rank=1), ffn=kt.LowRank(rank=2))
    )
    batches = [{"input_ids": make_inputs("bert", seed)["input_ids"]} for seed in range(4)]

    def distance() -> float:
        with torch.no_grad():
            return sum(
                float(
                    (
                        student(**b, output_hidden_states=True).hidden_states[-1]
                        - teacher(**b, output_hidden_states=True).hidden_states[-1]
                    )
                    .pow(2)
                    .mean()
                )
                for b in batches
            )

    before = distance()
    losses = kt.distill(student, teacher, batches, steps=60, lr=1e-3, layer_outputs=True)
    student.eval()
    assert losses[-1] < losses[0] and distance() < 0.7 * before


def skewed_embedding_task(vocab: int = 60, dim: int = 12, seed: int = 0):
    """An embedding and token frequencies that factor over the vocabulary digits (a 6 x 10 grid), Zipf-like."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64)
    frequency = torch.kron(
        1.0 / torch.arange(1, 7, dtype=torch.float64), 1.0 / torch.arange(1, 11, dtype=torch.float64) ** 2
    )
    return weight, frequency / frequency.sum()


def test_row_weighted_low_rank_embedding_is_the_exact_optimum():
    from kron_transformers.factorizations import LowRankFactorization
    from kron_transformers.factorizations.weighted import row_weighted_error

    weight, frequency = skewed_embedding_task()
    calibrated = LowRankFactorization(60, 12, rank=3).double()
    assert calibrated.fit_row_weighted(weight, frequency)
    singular = torch.linalg.svdvals(weight * frequency.sqrt()[:, None])
    optimum = float(singular[3:].norm() / singular.norm())
    error = row_weighted_error(weight, calibrated.materialize().detach(), frequency)
    assert error == pytest.approx(optimum, rel=1e-4)
    plain = LowRankFactorization(60, 12, rank=3).double()
    plain.fit(weight)
    assert error < row_weighted_error(weight, plain.materialize().detach(), frequency)


def test_row_weighted_kronecker_embedding_beats_svd_on_frequent_tokens():
    from kron_transformers.factorizations import KroneckerSum
    from kron_transformers.factorizations.weighted import row_weighted_error

    weight, frequency = skewed_embedding_task()
    errors = {}
    for weighted in (False, True):
        factorization = KroneckerSum(60, 12, ((6, 3), (10, 4)), rank=2).double()
        factorization.fit_row_weighted(weight, frequency) if weighted else factorization.fit(weight)
        errors[weighted] = row_weighted_error(weight, factorization.materialize().detach(), frequency)
    assert errors[True] < errors[False]


def test_calibrate_counts_embedding_lookups():
    model = build_model("bert")
    ids = make_inputs("bert")["input_ids"]
    stats = kt.calibrate(model, [{"input_ids": ids}])
    frequency = stats.token_frequency("bert.embeddings.word_embeddings")
    torch.testing.assert_close(frequency, torch.bincount(ids.reshape(-1), minlength=99).double() / ids.numel())


def test_calibrate_skips_embeddings_called_with_a_float_shape_carrier():
    """BART's learned positional embedding is called with a float tensor (for its shape only): no token counts."""
    model = build_model("bart")
    stats = kt.calibrate(model, [make_inputs("bart")])
    assert "model.encoder.embed_positions" not in stats.token_counts
    assert stats.token_counts["model.encoder.embed_tokens"].sum() > 0
