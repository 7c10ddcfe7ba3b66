"""``kt.reconstruct`` (block-wise fitting to the dense teacher) and ``kt.distill``'s schedule, loss and Accelerate."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, make_inputs

import kron_transformers as kt
from kron_transformers.reconstruct import find_blocks


def model_inputs(name: str, seed: int) -> dict[str, torch.Tensor]:
    inputs = make_inputs(name, seed)
    labels = inputs.pop("labels")
    if name == "t5":
        inputs["decoder_input_ids"] = labels
    return inputs


def compressed_pair(name: str):
    teacher = build_model(name)
    config = kt.KronConfig(attention=kt.Shapeshifter(rank=1), ffn=kt.LowRank(rank=2))
    return kt.compress_model(copy.deepcopy(teacher), config), teacher


def last_hidden_error(student, teacher, batches) -> float:
    with torch.no_grad():
        return sum(
            float((student(**b, output_hidden_states=True).hidden_states[-1]
                   - teacher(**b, output_hidden_states=True).hidden_states[-1]).pow(2).sum())
            for b in batches
        )  # fmt: skip


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_reconstruction_lowers_every_block_error(name):
    student, teacher = compressed_pair(name)
    batches = [model_inputs(name, seed) for seed in range(3)]
    before = last_hidden_error(student, teacher, batches)
    torch.manual_seed(0)
    report = kt.reconstruct(student, teacher, batches, steps=40, lr=1e-2)
    assert [block.name for block in report.blocks] == find_blocks(teacher) and len(report.blocks) == 2
    for block in report.blocks:
        assert block.error_after < 0.9 * block.error_before, block
        assert block.steps == 40 and block.parameters > 0
    assert last_hidden_error(student, teacher, batches) < 0.8 * before
    assert "error before" in str(report)
    assert not student.training and all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("with_bias", [True, False])
def test_refit_is_the_exact_asymmetric_least_squares_optimum(with_bias):
    """Float64, damping 0, LowRank rank 3 on a 7 x 11 layer: the refit equals the closed form — whitened rank-3
    projection of ``W* = W Sxx~ Sx~x~^-1`` under ``Sx~x~`` (covariances with a bias, second moments without) and
    ``b_hat = b + W mu - W_hat mu~`` — and beats fitting ``W`` itself on the student's inputs (GPTQ's target)."""
    from kron_transformers.factorizations import build_factorization
    from kron_transformers.modules import FactorizedLinear
    from kron_transformers.reconstruct import _refit_linear

    generator = torch.Generator().manual_seed(0)
    rows, cols, tokens, rank = 7, 11, 400, 3
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    bias = torch.randn(rows, generator=generator, dtype=torch.float64) if with_bias else None
    teacher_x = (
        torch.randn(tokens, cols, generator=generator, dtype=torch.float64)
        @ torch.randn(cols, cols, generator=generator, dtype=torch.float64)
        + 0.5
    )
    distortion = torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(
        cols, cols, generator=generator, dtype=torch.float64
    )
    student_x = (
        teacher_x @ distortion + 0.05 * torch.randn(tokens, cols, generator=generator, dtype=torch.float64) + 0.2
    )
    moments = (student_x.T @ student_x, teacher_x.T @ student_x, student_x.sum(0), teacher_x.sum(0), tokens)

    def module():
        layer = FactorizedLinear.wrap(
            build_factorization({"factorization": "low_rank", "rank": rank}, rows, cols), with_bias
        )
        return layer.double()

    refitted = module()
    assert _refit_linear(refitted, weight, bias, moments, damping=0.0)

    mu, mu_s = teacher_x.mean(0), student_x.mean(0)
    centred = with_bias
    xs = student_x - mu_s if centred else student_x
    xt = teacher_x - mu if centred else teacher_x
    sigma = xs.T @ xs / tokens
    target = weight @ (xt.T @ xs / tokens) @ torch.linalg.inv(sigma)
    values, vectors = torch.linalg.eigh(sigma)
    root, inverse_root = (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T
    u, singular, v = torch.linalg.svd(target @ root)
    expected = (u[:, :rank] * singular[:rank]) @ v[:rank] @ inverse_root
    assert torch.allclose(refitted.factorization.materialize(), expected, atol=1e-9)
    if with_bias:
        assert torch.allclose(refitted.bias, bias + weight @ mu - expected @ mu_s, atol=1e-9)

    def output_error(layer) -> float:
        dense = teacher_x @ weight.T + (0 if bias is None else bias)
        with torch.no_grad():
            return float((layer(student_x) - dense).pow(2).sum())

    symmetric = module()  # W fitted on the student's own inputs: x = x~
    symmetric_moments = (moments[0], moments[0], moments[2], moments[2], tokens)
    assert _refit_linear(symmetric, weight, bias, symmetric_moments, damping=0.0)
    assert output_error(refitted) < 0.9 * output_error(symmetric)


def test_refit_groups_linears_by_shared_input_in_execution_order():
    from kron_transformers.reconstruct import _capture_inputs, _refit_groups

    student, _ = compressed_pair("llama")
    inputs = _capture_inputs(student, "model.layers.1", [model_inputs("llama", 0)])
    assert _refit_groups(student.model.layers[1], inputs) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_refit_alone_lowers_every_block_error(name):
    student, teacher = compressed_pair(name)
    student.config.quantization_config.calibration_time_ratio = None  # the refit's ALS: fixed sweeps, not a time cap
    batches = [model_inputs(name, seed) for seed in range(3)]
    before = last_hidden_error(student, teacher, batches)
    report = kt.reconstruct(student, teacher, batches, steps=0, refit=True)
    for block in report.blocks:
        assert block.error_after < 0.95 * block.error_before, block
        assert block.steps == 0
    assert last_hidden_error(student, teacher, batches) < 0.9 * before


def test_student_targets_are_the_dense_block_on_the_students_own_inputs():
    student, teacher = compressed_pair("gpt2")
    batches = [model_inputs("gpt2", seed) for seed in range(2)]
    report = kt.reconstruct(student, teacher, batches, steps=0, target_inputs="student")
    # block 1's "before" error: the student's block 1 on the student's block-1 inputs vs the teacher's block 1 there
    captured = {}
    handle = student.transformer.h[1].register_forward_pre_hook(
        lambda m, a, k: captured.setdefault(len(captured), (a, k)), with_kwargs=True
    )
    with torch.no_grad():
        for b in batches:
            student(**b, use_cache=False)
    handle.remove()
    error = energy = 0.0
    with torch.no_grad():
        for args, kwargs in captured.values():
            s = student.transformer.h[1](*args, **kwargs)
            t = teacher.transformer.h[1](*args, **kwargs)
            s, t = (s[0], t[0]) if isinstance(s, tuple) else (s, t)
            error += float((s - t).pow(2).sum())
            energy += float(t.pow(2).sum())
    assert report.blocks[1].error_before == pytest.approx(error / energy, rel=1e-5)
    assert report.blocks[1].error_after == report.blocks[1].error_before  # steps=0 changes nothing


@pytest.mark.parametrize("name, chained", [("bert", True), ("llama", True), ("t5", False)])
def test_next_block_inputs_are_the_previous_outputs_where_the_stack_passes_them_on(name, chained):
    """BERT/Llama blocks read their predecessor's output with the same masks: block 1's inputs come from block 0's
    outputs with one model forward (the check on the first batch). T5's block 0 hands block 1 the position bias
    it made, so there the model runs up to block 1 on every batch. Either way the inputs equal a real capture."""
    from kron_transformers.reconstruct import _block_outputs, _capture_inputs, _next_block_inputs, _same

    student, _ = compressed_pair(name)
    batches = [model_inputs(name, seed) for seed in range(3)]
    first, second = find_blocks(student)[:2]
    inputs = _capture_inputs(student, first, batches)
    outputs = _block_outputs(student.get_submodule(first), inputs)
    forwards = []  # runs of block 0 inside _next_block_inputs: one per model forward
    handle = student.get_submodule(first).register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        following = _next_block_inputs(student, second, batches, inputs, outputs)
    finally:
        handle.remove()
    assert len(forwards) == (1 if chained else 3)
    expected = _capture_inputs(student, second, batches)
    assert len(following) == 3 and all(_same(a, b) for a, b in zip(following, expected))


def test_refit_moments_stop_the_block_at_the_group_input():
    """The moments of a block's first group (query, key, value) run neither the attention output nor the FFN."""
    from kron_transformers.reconstruct import _capture_inputs, _group_moments, _refit_groups

    student, teacher = compressed_pair("llama")
    batches = [model_inputs("llama", seed) for seed in range(2)]
    inputs = _capture_inputs(student, "model.layers.1", batches)
    block, dense_block = student.model.layers[1], teacher.model.layers[1]
    first_group = _refit_groups(block, inputs)[0]
    later = []
    handles = [
        module.register_forward_hook(lambda *_: later.append(1))
        for module in (block.self_attn.o_proj, block.mlp, dense_block.self_attn.o_proj, dense_block.mlp)
    ]
    try:
        gram, cross, student_sum, _, count = _group_moments(block, dense_block, first_group, inputs, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert later == []
    assert count == sum(b["input_ids"].numel() for b in batches)
    assert torch.allclose(gram, cross)  # the same inputs on both sides, and the first group reads the block's norm
    assert float(gram.trace()) > 0 and student_sum.shape == (gram.shape[0],)


def test_encoder_decoder_stacks_are_reconstructed_in_execution_order():
    student, teacher = compressed_pair("t5")
    batches = [model_inputs("t5", seed) for seed in range(2)]
    report = kt.reconstruct(student, teacher, batches, steps=20, lr=1e-2, target_inputs="student")
    assert [b.name for b in report.blocks] == [f"{s}.block.{i}" for s in ("encoder", "decoder") for i in range(2)]
    assert all(b.error_after <= b.error_before for b in report.blocks)
    assert sum(b.error_after for b in report.blocks) < sum(b.error_before for b in report.blocks)


def test_steps_per_block_follow_the_execution_order():
    student, teacher = compressed_pair("t5")
    batches = [model_inputs("t5", seed) for seed in range(2)]
    untouched = copy.deepcopy(student.encoder.block[0].state_dict())
    report = kt.reconstruct(student, teacher, batches, steps=[0, 15, 0, 25], lr=1e-2, target_inputs="student")
    assert [(b.name, b.steps) for b in report.blocks] == [
        ("encoder.block.0", 0), ("encoder.block.1", 15), ("decoder.block.0", 0), ("decoder.block.1", 25),
    ]  # fmt: skip
    assert all(torch.equal(value, student.encoder.block[0].state_dict()[key]) for key, value in untouched.items())
    assert report.blocks[0].error_after == report.blocks[0].error_before
    assert report.blocks[3].error_after < 0.9 * report.blocks[3].error_before


def test_reconstruct_rejects_bad_arguments():
    student, teacher = compressed_pair("bert")
    batches = [model_inputs("bert", 0)]
    expected = r"steps must be an int >= 0 or 2 of them, one per block in execution order \(bert.encoder.layer.0, "
    for steps in (-1, [5], [5, -1]):
        with pytest.raises(ValueError, match=expected):
            kt.reconstruct(student, teacher, batches, steps=steps)
    with pytest.raises(ValueError, match="target_inputs must be one of"):
        kt.reconstruct(student, teacher, batches, target_inputs="dense")
    with pytest.raises(ValueError, match="batches is empty"):
        kt.reconstruct(student, teacher, [])
    with pytest.raises(ValueError, match="found no transformer blocks"):
        kt.reconstruct(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), [{"input": torch.ones(1, 2)}])
    with pytest.raises(ValueError, match="has no module"):
        kt.reconstruct(student, teacher, batches, blocks=["bert.encoder.layer.7"])


def test_distill_defaults_lower_the_hidden_state_error_with_a_decaying_schedule():
    student, teacher = compressed_pair("bert")
    batches = [{"input_ids": model_inputs("bert", seed)["input_ids"]} for seed in range(4)]
    before = last_hidden_error(student, teacher, batches)
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    losses = kt.distill(student, teacher, batches, steps=60, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine decay to 0
    assert losses[-1] < losses[0]
    assert last_hidden_error(student, teacher, batches) < 0.7 * before
    with pytest.raises(ValueError, match="schedule must be one of"):
        kt.distill(student, teacher, batches, steps=2, schedule="step")


def test_distill_hidden_loss_is_relative_to_the_teachers_variance():
    student, teacher = compressed_pair("bert")
    batch = {"input_ids": model_inputs("bert", 0)["input_ids"]}
    loss = kt.distill(student, teacher, [batch], steps=1, lr=1e-12, logit_weight=0.0)[0]
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True).hidden_states
        t = teacher(**batch, output_hidden_states=True).hidden_states
    expected = sum(float((a - b).pow(2).mean() / b.var()) for a, b in zip(s, t)) / len(t)
    assert loss == pytest.approx(expected, rel=1e-4)


def test_distill_through_accelerate():
    from accelerate import Accelerator

    student, teacher = compressed_pair("gpt2")
    batches = [{"input_ids": model_inputs("gpt2", seed)["input_ids"]} for seed in range(3)]
    before = last_hidden_error(student, teacher, batches)
    losses = kt.distill(student, teacher, batches, steps=30, lr=1e-2, accelerator=Accelerator(cpu=True))
    assert losses[-1] < losses[0] and last_hidden_error(student, teacher, batches) < before
