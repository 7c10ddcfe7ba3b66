"""Triton TT row gather and TT embedding bag vs a float64 einsum TT table (interpreted on CPU, TRITON_INTERPRET=1;
compiled on a GPU machine, ``conftest.on_kernel_device``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import on_kernel_device


triton = pytest.importorskip("triton")

from kron_transformers.kernels import triton_tensor_train  # noqa: E402
from kron_transformers.kernels.coverage import tt_embedding_bag_covers, tt_gather_rows_covers  # noqa: E402


tt_gather_rows_triton = on_kernel_device(triton_tensor_train.tt_gather_rows_triton)
tt_embedding_bag_triton = on_kernel_device(triton_tensor_train.tt_embedding_bag_triton)


TOLERANCES = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = {
    "d2": [(1, 3, 5, 2), (2, 4, 3, 1)],
    "d2_rank1": [(1, 5, 3, 1), (1, 4, 6, 1)],
    "d3": [(1, 2, 3, 3), (3, 3, 2, 5), (5, 2, 5, 1)],
    "d4": [(1, 2, 2, 2), (2, 2, 3, 3), (3, 2, 2, 2), (2, 3, 2, 1)],
    "d3_rank20": [(1, 2, 3, 20), (20, 2, 2, 17), (17, 3, 2, 1)],  # rank block 32, eight warps
    # rank block 64: the chain steps as n_k masked (BLOCK_H, R) x (R, R) products, forward and backward
    "d3_rank64": [(1, 3, 5, 64), (64, 3, 3, 45), (45, 2, 7, 1)],
    "d4_rank64": [(1, 2, 3, 33), (33, 3, 3, 64), (64, 2, 5, 64), (64, 3, 3, 1)],
}


def tt_table(cores: list[torch.Tensor], cols: int) -> torch.Tensor:
    """``W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :]`` by einsum, cropped to ``cols``."""
    table = cores[0][0]  # (rows, cols, R)
    for core in cores[1:]:
        table = torch.einsum("ijr,rkls->ikjls", table, core)
        rows, core_rows, width, core_cols, rank = table.shape
        table = table.reshape(rows * core_rows, width * core_cols, rank)
    return table[..., 0][:, :cols]


def random_cores(shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def assert_close_scaled(actual, expected, dtype):
    scale = expected.abs().max().clamp(min=1).item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=TOLERANCES[dtype] * scale)


def check(run, reference_run, cores, extra=(), seed=1):
    """Forward and gradients (cores and ``extra`` float inputs) of ``run`` vs ``reference_run`` in float64."""
    dtype = cores[0].dtype
    inputs = [tensor.clone().requires_grad_() for tensor in [*cores, *extra]]
    reference_inputs = [tensor.detach().double().requires_grad_() for tensor in inputs]
    out = run(inputs[: len(cores)], *inputs[len(cores) :])
    reference = reference_run(reference_inputs[: len(cores)], *reference_inputs[len(cores) :])
    assert out.shape == reference.shape and out.dtype == dtype
    assert_close_scaled(out, reference, dtype)
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(reference.shape, generator=generator, dtype=torch.float64).to(dtype)
    out.backward(grad)
    reference.backward(grad.double())
    for tensor, reference_tensor in zip(inputs, reference_inputs):
        assert tensor.grad.dtype == tensor.dtype
        assert_close_scaled(tensor.grad, reference_tensor.grad, dtype)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every float ``torch.empty`` (outputs, partial sums) starts as NaN, so unwritten entries show."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_gather_matches_tt_table(name, poisoned_buffers):
    shapes = SHAPES[name]
    rows, cols = math.prod(s[1] for s in shapes), math.prod(s[2] for s in shapes) - 1
    ids = torch.randint(0, rows, (3, 4), generator=torch.Generator().manual_seed(2))
    ids[0] = rows - 1  # a hot id and the last row
    check(
        lambda cores: tt_gather_rows_triton(ids, cores, cols),
        lambda cores: tt_table(cores, cols)[ids],
        random_cores(shapes),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_half_precision(dtype, poisoned_buffers):
    ids = torch.tensor([[0, 7, 7], [5, 11, 9]])
    cores = random_cores(SHAPES["d3"], dtype)
    check(lambda cores: tt_gather_rows_triton(ids, cores, 30), lambda cores: tt_table(cores, 30)[ids], cores)


def test_gather_several_head_blocks(monkeypatch, poisoned_buffers):
    monkeypatch.setattr(triton_tensor_train, "_MAX_TILE_ELEMENTS", 256)
    shapes = [(1, 2, 5, 3), (3, 3, 7, 2), (2, 2, 3, 1)]
    assert triton_tensor_train._blocks([torch.empty(s) for s in shapes])[1] == 16  # 35 head columns: 3 blocks
    ids = torch.tensor([11, 0, 4, 11])
    check(
        lambda cores: tt_gather_rows_triton(ids, cores, 100),
        lambda cores: tt_table(cores, 100)[ids],
        random_cores(shapes),
    )


def test_gather_hot_ids_deterministic(poisoned_buffers):
    generator = torch.Generator().manual_seed(3)
    ids = torch.where(torch.rand(48, generator=generator) < 0.8, 7, torch.randint(0, 12, (48,), generator=generator))
    shapes = SHAPES["d2"]
    check(
        lambda cores: tt_gather_rows_triton(ids, cores, 15),
        lambda cores: tt_table(cores, 15)[ids],
        random_cores(shapes),
    )
    cores = [core.requires_grad_() for core in random_cores(shapes)]
    grad = torch.randn(48, 15, generator=generator)
    first = torch.autograd.grad(tt_gather_rows_triton(ids, cores, 15), cores, grad)
    second = torch.autograd.grad(tt_gather_rows_triton(ids, cores, 15), cores, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_gather_empty_ids(shape):
    cores = [core.requires_grad_() for core in random_cores(SHAPES["d2"])]
    out = tt_gather_rows_triton(torch.empty(shape, dtype=torch.long), cores, 7)
    assert out.shape == (*shape, 7)
    out.sum().backward()
    assert all(torch.equal(core.grad, torch.zeros_like(core)) for core in cores)


BAG_IDS = torch.tensor([3, 3, 11, 0, 3, 7, 7, 5, 3, 1, 11, 2])
BAG_OFFSETS = torch.tensor([0, 3, 3, 4, 9, 9])  # empty bags at 1 and 4, last bag ends at len(ids)


@pytest.mark.parametrize("name", ["d2", "d3", "d3_rank64"])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_bag_matches_embedding_bag_on_tt_table(name, mode, weighted, poisoned_buffers):
    shapes = SHAPES[name]
    cols = math.prod(s[2] for s in shapes) - 2
    weights = [torch.randn(len(BAG_IDS), generator=torch.Generator().manual_seed(4))] if weighted else []

    def run(cores, *weights):
        return tt_embedding_bag_triton(BAG_IDS, BAG_OFFSETS, weights[0] if weights else None, cores, cols, mode)

    def reference(cores, *weights):
        table = tt_table(cores, cols)
        return F.embedding_bag(
            BAG_IDS, table, BAG_OFFSETS, mode=mode, per_sample_weights=weights[0] if weights else None
        )

    check(run, reference, random_cores(shapes), extra=weights)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bag_half_precision_weighted(dtype, poisoned_buffers):
    weights = [torch.rand(len(BAG_IDS), generator=torch.Generator().manual_seed(5)).to(dtype)]

    def run(cores, weights):
        return tt_embedding_bag_triton(BAG_IDS, BAG_OFFSETS, weights, cores, 14, "sum")

    def reference(cores, weights):
        return F.embedding_bag(BAG_IDS, tt_table(cores, 14), BAG_OFFSETS, mode="sum", per_sample_weights=weights)

    check(run, reference, random_cores(SHAPES["d2"], dtype), extra=weights)


def test_bag_two_dimensional_ids_without_offsets():
    ids = torch.tensor([[1, 4, 4], [0, 11, 2]])
    cores = random_cores(SHAPES["d2"])
    expected = F.embedding_bag(ids, tt_table([c.double() for c in cores], 15), mode="mean")
    assert_close_scaled(tt_embedding_bag_triton(ids, None, None, cores, 15, "mean"), expected, torch.float32)


def test_bag_without_ids_gives_zero_bags():
    cores = [core.requires_grad_() for core in random_cores(SHAPES["d2"])]
    out = tt_embedding_bag_triton(
        torch.empty(0, dtype=torch.long), torch.zeros(3, dtype=torch.long), None, cores, 9, "mean"
    )
    assert torch.equal(out, torch.zeros(3, 9))
    out.sum().backward()
    assert all(torch.equal(core.grad, torch.zeros_like(core)) for core in cores)


def test_bag_without_bags():
    cores = [core.requires_grad_() for core in random_cores(SHAPES["d2"])]
    weights = torch.ones(3, requires_grad=True)
    out = tt_embedding_bag_triton(torch.tensor([1, 4, 4]), torch.zeros(0, dtype=torch.long), weights, cores, 9, "sum")
    assert out.shape == (0, 9)
    out.sum().backward()
    assert torch.equal(weights.grad, torch.zeros(3))
    assert all(torch.equal(core.grad, torch.zeros_like(core)) for core in cores)


def test_covers_and_errors():
    cores = random_cores(SHAPES["d3"])
    ids = torch.tensor([1, 2])
    offsets = torch.tensor([0])
    assert tt_gather_rows_covers(ids, cores, 30)
    assert tt_embedding_bag_covers(ids, offsets, torch.ones(2), cores, 30, "sum")
    bad_gathers = [
        (ids.float(), cores, 30),
        (ids, cores[:1], 5),
        (ids, [cores[0], cores[1][:2], cores[2]], 30),  # ranks do not chain
        (ids, [cores[0], cores[1], torch.randn(5, 2, 5, 2)], 30),  # R_d != 1
        (ids, [cores[0], cores[1].double(), cores[2]], 30),
        (ids, cores, 31),
        (ids, [cores[0], cores[1][0], cores[2]], 30),
    ]
    for arguments in bad_gathers:
        assert not tt_gather_rows_covers(*arguments)
        with pytest.raises(ValueError, match="tt_gather_rows_triton"):
            tt_gather_rows_triton(*arguments)
    bad_bags = [
        (ids, offsets, torch.ones(2), cores, 30, "mean"),  # weights need mode="sum", as nn.EmbeddingBag
        (ids, offsets, None, cores, 30, "max"),
        (ids, offsets, torch.ones(3), cores, 30, "sum"),
        (ids, offsets.float(), None, cores, 30, "sum"),
        (ids, None, None, cores, 30, "sum"),
        (ids[None], offsets, None, cores, 30, "sum"),
    ]
    for arguments in bad_bags:
        assert not tt_embedding_bag_covers(*arguments)
        with pytest.raises(ValueError, match="tt_embedding_bag_triton"):
            tt_embedding_bag_triton(*arguments)
