"""KPD block sparsity (Zhu et al.): proximal l1, freezing, eq. 5 shapes, pattern selection, block-sparse export."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import build_model, make_inputs
from torch import nn
from transformers import AutoModelForMaskedLM

import kron_transformers as kt


def kpd_mlp(block_size=(2, 2), rank=2, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    config = kt.KronConfig(default=kt.KPD(rank=rank, block_size=block_size), target_modules=["0", "2"])
    return kt.compress_model(model, config)


def regression_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=generator)
    return x, torch.randn(256, 8, generator=generator)


def test_l1_penalty_is_the_sum_of_abs_s():
    model = kpd_mlp()
    factorizations = kt.kpd.kpd_factorizations(model).values()
    with torch.no_grad():
        for f in factorizations:
            f.s.normal_()
    expected = sum(f.s.abs().sum() for f in factorizations)
    torch.testing.assert_close(kt.kpd.l1_penalty(model), expected)


def test_proximal_step_is_the_soft_threshold():
    model = kpd_mlp()
    s = next(iter(kt.kpd.kpd_factorizations(model).values())).s
    with torch.no_grad():
        s.copy_(torch.linspace(-1, 1, s.numel()).reshape(s.shape))
    before = s.detach().clone()
    kt.kpd.proximal_step(model, lr=0.5, strength=0.6)  # threshold 0.3
    expected = torch.sign(before) * (before.abs() - 0.3).clamp_min(0)
    torch.testing.assert_close(s.detach(), expected, rtol=0, atol=0)


def test_adam_with_l1_alone_never_zeroes_s_but_the_proximal_step_does():
    x, y = regression_data()
    results = {}
    for use_proximal in (False, True):
        model = kpd_mlp()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(60):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if not use_proximal:
                loss = loss + 1e-2 * kt.kpd.l1_penalty(model)
            loss.backward()
            optimizer.step()
            if use_proximal:
                kt.kpd.proximal_step(model, lr=1e-2, strength=2.0)
        results[use_proximal] = kt.kpd.sparsity(model)
    assert all(value == 0.0 for value in results[False].values())
    assert all(value > 0.1 for value in results[True].values())


def kpd_lasso(precondition: bool, strength: float = 1e-3, steps: int = 1500):
    """Eq. 4 with A, B fixed (convex in S): full-batch Adam, cosine lr, the proximal step; S and dJ/dS at the end."""
    torch.manual_seed(0)
    config = kt.KronConfig(default=kt.KPD(rank=2, block_size=(2, 2)), target_modules=["0"])
    model = kt.compress_model(nn.Sequential(nn.Linear(32, 16)), config).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=generator, dtype=torch.float64)
    y = torch.randn(256, 16, generator=generator, dtype=torch.float64)
    s = next(iter(kt.kpd.kpd_factorizations(model).values())).s
    for parameter in model.parameters():
        parameter.requires_grad_(parameter is s)
    optimizer = torch.optim.Adam([s], lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        kt.kpd.proximal_step(model, lr=lr, strength=strength, optimizer=optimizer if precondition else None)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return s.detach(), s.grad


def test_proximal_step_in_adams_metric_reaches_the_l1_problems_optimum():
    """Eq. 4's optimality conditions: dJ/dS = -lambda sign(S) where S != 0, |dJ/dS| <= lambda where S = 0."""
    strength = 1e-3
    s, grad = kpd_lasso(precondition=True, strength=strength)
    zero = s == 0
    assert 0.2 < zero.float().mean() < 0.9
    assert grad[zero].abs().max() <= strength * 1.001
    torch.testing.assert_close(grad[~zero], -strength * torch.sign(s[~zero]), rtol=0, atol=0.02 * strength)
    # The plain threshold lr * strength after Adam's steps ignores lambda: no zeros, about the unregularized optimum.
    s, grad = kpd_lasso(precondition=False, strength=strength)
    assert not (s == 0).any() and (grad + strength * torch.sign(s)).abs().min() > 0.8 * strength


def test_proximal_step_with_adam_is_the_soft_threshold_at_adams_step_sizes():
    model = kpd_mlp()
    x, y = regression_data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    before = {name: f.s.detach().clone() for name, f in kt.kpd.kpd_factorizations(model).items()}
    kt.kpd.proximal_step(model, lr=1e-2, strength=0.05, optimizer=optimizer)
    for name, f in kt.kpd.kpd_factorizations(model).items():
        state = optimizer.state[f.s]
        v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        threshold = 1e-2 * 0.05 / (v_hat.sqrt() + 1e-6)
        expected = torch.sign(before[name]) * (before[name].abs() - threshold).clamp_min(0)
        torch.testing.assert_close(f.s.detach(), expected)


@pytest.mark.parametrize(
    "optimizer, error, message",
    [
        (lambda model: torch.optim.SGD(model.parameters(), lr=0.1), TypeError, "needs torch.optim.Adam or AdamW"),
        (lambda model: torch.optim.Adam(model.parameters(), amsgrad=True), TypeError, "without amsgrad"),
        (lambda model: torch.optim.Adam([nn.Parameter(torch.ones(1))]), ValueError, "0.factorization.s is not among"),
    ],
)
def test_proximal_step_rejects_an_optimizer_it_cannot_precondition_with(optimizer, error, message):
    model = kpd_mlp()
    with pytest.raises(error, match=message):
        kt.kpd.proximal_step(model, lr=1e-2, strength=1.0, optimizer=optimizer(model))


def test_sparsity_counts_with_abs():
    model = kpd_mlp()
    s = next(iter(kt.kpd.kpd_factorizations(model).values())).s
    with torch.no_grad():
        s.fill_(-1.0)  # negative entries are not zeros (the reference counted s < 1e-5)
        s[0, 0] = 0.0
    assert list(kt.kpd.sparsity(model).values())[0] == pytest.approx(1 / s.numel())


def test_threshold_and_freeze_keeps_entries_at_zero_under_adam():
    x, y = regression_data()
    model = kpd_mlp()
    with torch.no_grad():
        for f in kt.kpd.kpd_factorizations(model).values():
            f.s.uniform_(-1, 1)
    frozen = kt.kpd.threshold_and_freeze(model, threshold=0.5)
    assert frozen > 0
    masks = {name: f.s.detach() == 0 for name, f in kt.kpd.kpd_factorizations(model).items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        kt.kpd.proximal_step(model, lr=0.0, strength=0.0)  # re-applies the freeze after Adam's momentum
    for name, f in kt.kpd.kpd_factorizations(model).items():
        assert torch.count_nonzero(f.s.detach()[masks[name]]) == 0
    assert "s_frozen_zero" not in model.state_dict().keys()


@pytest.mark.parametrize("m, n, rank", [(8, 256, 1), (10, 784, 2), (64, 48, 3), (12, 18, 1)])
def test_optimal_factor_shapes_solve_eq5_exactly(m, n, rank):
    (m1, n1), (m2, n2) = kt.kpd.optimal_factor_shapes(m, n, rank)
    assert m1 * m2 == m and n1 * n2 == n
    best = min(
        (1 + rank) * a * b + rank * (m // a) * (n // b)
        for a, b in itertools.product(range(1, m + 1), range(1, n + 1))
        if m % a == 0 and n % b == 0
    )
    assert (1 + rank) * m1 * n1 + rank * m2 * n2 == best


def test_kpd_compression_uses_eq5_shapes():
    structure = kt.KPD(compression=8).resolve(64, 256, "linear", "layer")
    (_, _), (m2, n2) = kt.kpd.optimal_factor_shapes(64, 256, structure["rank"])
    assert structure["block_size"] == [m2, n2]


def planted_pattern_task(seed: int):
    """A 16x32 weight that is block-sparse with 4x4 blocks: only the (4, 4) pattern represents it exactly."""
    torch.manual_seed(seed)
    s = (torch.rand(4, 8) < 0.5).float() * torch.randn(4, 8)
    weight = torch.kron(s, torch.randn(4, 4))
    x = torch.randn(512, 32)
    return x, x @ weight.T


@pytest.mark.parametrize("seed", [0, 1])
def test_pattern_selection_keeps_the_planted_block_size(seed, tmp_path):
    x, y = planted_pattern_task(seed)
    model = nn.Sequential(nn.Linear(32, 16, bias=False))
    config = kt.KronConfig(
        default=kt.KPD(rank=1, block_sizes=[[2, 2], [4, 4], [8, 8]]), target_modules=["0"], init="random"
    )
    kt.compress_model(model, config)
    assert isinstance(model[0], kt.KPDPatternLinear)
    s_params = [p for n, p in model.named_parameters() if n.endswith(".s")]
    other = [p for n, p in model.named_parameters() if not n.endswith(".s")]
    optimizer = torch.optim.AdamW(
        [{"params": s_params, "weight_decay": 0.0}, {"params": other, "weight_decay": 0.1}], lr=0.02
    )
    schedule = kt.kpd.PatternSelection(lambda1=0.05, lambda2=0.001, increment=0.05, every_epochs=2)
    for _ in range(400):
        for start in range(0, 512, 128):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[start : start + 128]), y[start : start + 128]).backward()
            optimizer.step()
            schedule.after_optimizer_step(model, 0.02)
        if schedule.end_of_epoch(model):
            break
    assert kt.kpd.surviving_patterns(model) == [1]
    assert kt.kpd.finalize_patterns(model) == 1
    assert isinstance(model[0], kt.KPDLinear) and model[0].factorization.block_size == (4, 4)
    assert kt.applied_config(model).modules["0"]["structure"] == {
        "factorization": "kpd",
        "block_size": [4, 4],
        "rank": 1,
    }


def test_pattern_penalty_is_eq7():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    kt.compress_model(
        model, kt.KronConfig(default=kt.KPD(rank=1, block_sizes=[[2, 2], [4, 4]]), target_modules=["0", "1"])
    )
    layers = [model[0].factorization, model[1].factorization]
    with torch.no_grad():
        for layer in layers:
            for pattern in layer.patterns:
                pattern.s.normal_()
    group = [torch.sqrt(sum(layer.patterns[k].s.pow(2).sum() for layer in layers)) for k in range(2)]
    l1 = sum(p.s.abs().sum() for layer in layers for p in layer.patterns)
    torch.testing.assert_close(kt.kpd.pattern_penalty(model, 0.3, 0.7), 0.3 * sum(group) + 0.7 * l1)


def test_pattern_schedule_follows_the_paper():
    model = nn.Sequential(nn.Linear(8, 8))
    kt.compress_model(model, kt.KronConfig(default=kt.KPD(rank=1, block_sizes=[[2, 2], [4, 4]]), target_modules=["0"]))
    schedule = kt.kpd.PatternSelection()
    assert (schedule.lambda1, schedule.lambda2) == (0.01, 0.01)
    for _ in range(10):
        assert schedule.end_of_epoch(model) is False
    assert schedule.lambda1 == pytest.approx(0.014) and schedule.lambda2 == pytest.approx(0.014)


def test_block_sparse_export_is_exact_and_reloads(tmp_path):
    model = build_model("bert")
    kt.compress_model(model, kt.KronConfig(ffn=kt.KPD(rank=2, block_size=(4, 4)), init="svd"))
    with torch.no_grad():
        for f in kt.kpd.kpd_factorizations(model).values():
            f.s.masked_fill_(torch.rand_like(f.s) < 0.6, 0.0)
    inputs = make_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).logits
    reports = {r.name: r for r in kt.kpd.layer_report(model)}
    kt.kpd.to_block_sparse(model)
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, kt.BlockSparseLinear)
    report = reports["bert.encoder.layer.0.intermediate.dense"]
    assert layer.num_nonzeros() == report.inference_nonzeros
    assert report.inference_nonzeros <= (1 - report.sparsity) * 64 * 32 + 1e-9
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    kt.decompress_model(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_layer_report_counts_as_proposition_2():
    model = nn.Sequential(nn.Linear(784, 10))
    kt.compress_model(model, kt.KronConfig(default=kt.KPD(rank=2, block_size=(2, 2)), target_modules=["0"]))
    (report,) = kt.kpd.layer_report(model)
    assert report.training_parameters == 5 * 392 + 2 * (5 * 392 + 4)  # Zhu et al., Table 1: 5.89K at (2, 2)
    m, n, m1, n1, m2, n2, r = 10, 784, 5, 392, 2, 2, 2
    forward = 2 * r * m1 * n1 * (m2 + n2) - r * (m + 2 * m2 * n1) + 3 * m
    backward = r * ((2 * n1 * m2 * (n2 + m1) - n1 * m2 + m1 * n1) + (2 * m1 * n2 * (m2 + n1) + m1 * n1 - n2 * m1))
    backward += m + r * (4 * m1 * m2 * n1 - m2 * n1 + 2 * m2 * n1 * n2)
    assert report.training_flops == forward + backward
    assert report.dense_flops == 2 * (n + 1) * m + m * (2 * n + 1)


def test_trainer_callback_runs_the_schedule_and_stops_on_one_survivor():
    from types import SimpleNamespace

    from transformers import TrainerControl

    model = nn.Sequential(nn.Linear(8, 8))
    kt.compress_model(model, kt.KronConfig(default=kt.KPD(rank=1, block_sizes=[[2, 2], [4, 4]]), target_modules=["0"]))
    callback = kt.kpd.KPDPatternCallback(kt.kpd.PatternSelection(lambda1=0.0, lambda2=0.0))
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])
    control = TrainerControl()
    callback.on_step_end(None, None, control, model=model, optimizer=optimizer)
    assert not callback.on_epoch_end(None, None, control, model=model).should_training_stop
    with torch.no_grad():
        model[0].factorization.patterns[0].s.zero_()
    assert callback.on_epoch_end(None, None, control, model=model).should_training_stop
