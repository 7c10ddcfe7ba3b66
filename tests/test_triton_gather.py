"""Triton Kronecker row gather vs a float64 ``torch.kron`` table (interpreted on CPU, TRITON_INTERPRET=1; compiled
on a GPU machine, ``conftest.on_kernel_device``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import on_kernel_device


triton = pytest.importorskip("triton")

from kron_transformers.kernels import triton_gather  # noqa: E402
from kron_transformers.kernels.coverage import kron_gather_rows_covers  # noqa: E402
from kron_transformers.kernels.torch_ops import kron_gather_rows  # noqa: E402


kron_gather_rows_triton = on_kernel_device(triton_gather.kron_gather_rows_triton)


TOLERANCES = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def kron_table(factors: list[torch.Tensor], cols: int) -> torch.Tensor:
    """``sum_k F_1k ⊗ ... ⊗ F_nk`` with ``torch.kron``, cropped to ``cols``."""
    terms = []
    for k in range(factors[0].shape[0]):
        term = factors[0][k]
        for factor in factors[1:]:
            term = torch.kron(term, factor[k])
        terms.append(term)
    return torch.stack(terms).sum(0)[:, :cols]


def random_factors(shapes, dtype, generator):
    return [torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def check_against_table(ids, shapes, cols, dtype=torch.float32, seed=0):
    """Forward and factor gradients of the kernel vs autograd through the float64 table."""
    generator = torch.Generator().manual_seed(seed)
    factors = [f.requires_grad_() for f in random_factors(shapes, dtype, generator)]
    reference_factors = [f.detach().double().requires_grad_() for f in factors]
    out = kron_gather_rows_triton(ids, factors, cols)
    reference = kron_table(reference_factors, cols)[ids]
    assert out.shape == (*ids.shape, cols) and out.dtype == dtype
    scale = reference.abs().max().clamp(min=1).item()
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=TOLERANCES[dtype] * scale)
    grad = torch.randn(reference.shape, generator=generator, dtype=torch.float64).to(dtype)
    out.backward(grad)
    reference.backward(grad.double())
    for factor, reference_factor in zip(factors, reference_factors):
        assert factor.grad.dtype == dtype
        grad_scale = reference_factor.grad.abs().max().clamp(min=1).item()
        torch.testing.assert_close(
            factor.grad.double(), reference_factor.grad, rtol=0, atol=TOLERANCES[dtype] * grad_scale
        )


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every float ``torch.empty`` (outputs, partial sums) starts as NaN, so unwritten entries show."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.mark.parametrize(
    "shapes, cols",
    [
        ([(3, 5, 3), (3, 4, 6)], 17),  # rank 3, odd sizes, cropped
        ([(1, 7, 5), (1, 3, 3)], 15),  # rank 1, uncropped
        ([(2, 3, 2), (2, 2, 3), (2, 3, 5)], 29),  # order 3
        ([(2, 2, 2), (2, 3, 3), (2, 2, 2), (2, 2, 3)], 35),  # order 4
    ],
)
def test_forward_and_backward_match_kron_table(shapes, cols, poisoned_buffers):
    rows = math.prod(shape[1] for shape in shapes)
    ids = torch.randint(0, rows, (3, 5), generator=torch.Generator().manual_seed(1))
    ids[0] = rows - 1  # a hot id and the last row
    check_against_table(ids, shapes, cols)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_fp32(dtype, poisoned_buffers):
    check_against_table(torch.tensor([[0, 11, 11], [7, 3, 19]]), [(3, 4, 5), (3, 5, 7)], 33, dtype=dtype)


def test_several_head_blocks_and_rank_blocks(monkeypatch, poisoned_buffers):
    monkeypatch.setattr(triton_gather, "_MAX_TILE_ELEMENTS", 256)
    monkeypatch.setattr(triton_gather, "_MAX_RANK_BLOCK", 16)
    assert triton_gather._blocks([torch.empty(17, 3, 5), torch.empty(17, 2, 7), torch.empty(17, 2, 3)])[1] == 16
    check_against_table(torch.tensor([5, 0, 11, 5]), [(17, 3, 5), (17, 2, 7), (17, 2, 3)], 100)


def test_hot_ids_are_deduplicated_deterministically(poisoned_buffers):
    generator = torch.Generator().manual_seed(2)
    ids = torch.where(torch.rand(100, generator=generator) < 0.8, 4, torch.randint(0, 12, (100,), generator=generator))
    check_against_table(ids, [(2, 3, 3), (2, 4, 2)], 6)
    factors = [f.requires_grad_() for f in random_factors([(2, 3, 3), (2, 4, 2)], torch.float32, generator)]
    grad = torch.randn(100, 5, generator=generator)
    first = torch.autograd.grad(kron_gather_rows_triton(ids, factors, 5), factors, grad)
    second = torch.autograd.grad(kron_gather_rows_triton(ids, factors, 5), factors, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_single_id_matches_torch_reference():
    factors = random_factors([(4, 6, 3), (4, 5, 4)], torch.float32, torch.Generator().manual_seed(3))
    ids = torch.tensor([29])
    torch.testing.assert_close(kron_gather_rows_triton(ids, factors, 12), kron_gather_rows(ids, factors, 12))


@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_ids(shape):
    factors = [f.requires_grad_() for f in random_factors([(2, 3, 4), (2, 3, 2)], torch.float32, None)]
    out = kron_gather_rows_triton(torch.empty(shape, dtype=torch.long), factors, 7)
    assert out.shape == (*shape, 7)
    out.sum().backward()
    assert all(torch.equal(f.grad, torch.zeros_like(f)) for f in factors)


def test_covers_and_errors():
    factors = random_factors([(2, 3, 4), (2, 3, 2)], torch.float32, None)
    ids = torch.tensor([1, 2])
    assert kron_gather_rows_covers(ids, factors, 8)
    assert kron_gather_rows_covers(ids.int(), [f.bfloat16() for f in factors], 1)
    bad_arguments = [
        (ids.float(), factors, 8),
        (ids, factors[:1], 4),
        (ids, [factors[0], factors[1][:1]], 8),
        (ids, [factors[0], factors[1].double()], 8),
        (ids, factors, 9),
        (ids, factors, 0),
        (ids, [factors[0], factors[1][0]], 8),
    ]
    for arguments in bad_arguments:
        assert not kron_gather_rows_covers(*arguments)
        with pytest.raises(ValueError, match="kron_gather_rows_triton"):
            kron_gather_rows_triton(*arguments)


def test_kernels_compile_for_cuda():
    """The interpreter never lowers the kernels: compile them for sm_90 (no GPU needed)."""
    from cuda_compile import compile_for_cuda

    scalars = dict(rank="i32", cols="i32", head_size="i32", last_width="i32")
    blocks = dict(ORDER=3, BLOCK_H=32, BLOCK_R=16, BLOCK_B=64)  # distinct sizes: shape mismatches fail
    forward = dict(ids_ptr="*i64", factors_ptr="*bf16", meta_ptr="*i64", out_ptr="*bf16", **scalars)
    backward = dict(
        grad_ptr="*fp32",
        slot_ids_ptr="*i64",
        num_unique_ptr="*i64",
        factors_ptr="*bf16",
        meta_ptr="*i64",
        contrib_ptr="*fp32",
        contrib_width="i32",
        head_blocks="i32",
        **scalars,
    )
    segment_sum = dict(
        src_ptr="*bf16",
        src_row_stride="i64",
        row_index_ptr="*i64",
        scale_ptr="*fp32",
        starts_ptr="*i64",
        ends_ptr="*i64",
        out_ptr="*fp32",
        n_cols="i32",
        splits="i32",
    )
    module = "kron_transformers.kernels.triton_gather"
    usage = compile_for_cuda(
        [
            (module, "_kron_gather_forward_kernel", forward, blocks),
            (module, "_kron_gather_backward_kernel", backward, dict(blocks, BLOCK_BJ=128)),
            (
                "kron_transformers.kernels.triton_segment",
                "_segment_sum_kernel",
                segment_sum,
                dict(HAS_SCALE=True, BLOCK_P=16, BLOCK_C=128),
            ),
        ]
    )
    assert [used["stack"] for used in usage] == [0] * len(usage), f"register spills: {usage}"
