"""Fused Kronecker-sum linear kernels vs the float64 ``torch.kron`` reference (interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from kron_transformers.kernels import triton_kron_linear  # noqa: E402
from kron_transformers.kernels.library_ops import kron_linear  # noqa: E402


def _poisoned_buffer(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output and partial starts as NaN: an unwritten tile fails the comparison."""
    monkeypatch.setattr(triton_kron_linear, "_new_buffer", _poisoned_buffer)


@triton.jit
def _bf16_dot_probe(x_ptr, out_ptr):
    offsets = tl.arange(0, 16)
    tile = tl.load(x_ptr + offsets[:, None] * 16 + offsets[None, :])
    tl.store(out_ptr + offsets[:, None] * 16 + offsets[None, :], tl.dot(tile, tile))


def bf16_dot_works() -> bool:
    """The Triton 3.x interpreter computes ``tl.dot`` on bf16 tiles wrongly; CUDA does not. Probe, don't assume."""
    x = torch.randn(16, 16, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    out = torch.empty(16, 16, dtype=torch.float32, device=x.device)
    _bf16_dot_probe[(1,)](x, out)
    return torch.allclose(out, x.float() @ x.float(), rtol=1e-2, atol=1e-2)


def skip_unless_dtype_runs(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not bf16_dot_works():
        pytest.skip("this Triton interpreter's tl.dot is wrong on bf16 tiles (checked by a probe); runs on CUDA")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}  # relative to the output scale


def random_case(rank, a1, b1, a2, b2, dtype=torch.float32, with_scale=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, a1, b1, generator=generator)
    b = torch.randn(rank, a2, b2, generator=generator)
    scale = torch.randn(a1, b1, generator=generator) if with_scale else None
    return [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (a, b, scale)]


def dense_reference(a, b, scale, rows, cols):
    """``sum_k (S ⊙ A_k) ⊗ B_k`` in float64 by ``torch.kron``, cropped to ``(rows, cols)``."""
    a = a.double() * (scale.double() if scale is not None else 1.0)
    return sum(torch.kron(a[k], b[k].double()) for k in range(a.shape[0]))[:rows, :cols]


def assert_close(actual, expected, dtype):
    scale = expected.abs().max().clamp_min(1.0)
    error = (actual.double() - expected).abs().max()
    assert not torch.isnan(actual).any()
    assert error <= TOLERANCES[dtype] * scale, f"max error {error.item():.3g} vs scale {scale.item():.3g}"


def check_against_reference(x, a, b, scale, out_features, dtype, block_n=None, rank_splits=None):
    """Forward and all gradients of ``kron_linear`` vs autograd through the dense float64 product."""
    y = kron_linear(x, a, b, out_features, scale=scale, block_n=block_n, rank_splits=rank_splits)
    weight = dense_reference(a, b, scale, out_features, x.shape[-1])
    expected = x.double() @ weight.T
    assert y.shape == expected.shape and y.dtype == x.dtype
    assert_close(y, expected, dtype)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    inputs = [t for t in (x, a, b, scale) if t is not None]
    grads = torch.autograd.grad(y, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out.double())
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype
        assert_close(grad, expected_grad, dtype)


# (rank, a1, b1, a2, b2, in_features, out_features, rows, block_n)
SHAPES = [
    (1, 2, 3, 3, 2, 6, 6, 1, None),  # rank 1, one row, no padding
    (3, 3, 5, 4, 3, 14, 11, 7, 2),  # input padded 14 -> 15, output cropped 12 -> 11, 4 row tiles, 2 partials
    (2, 5, 2, 3, 7, 13, 15, 5, 4),  # odd everything, ragged last row tile
    (2, 2, 2, 33, 33, 65, 63, 3, None),  # two i2 tiles and two j2 chunks (blocks of 32)
    (1, 65, 1, 1, 2, 2, 65, 2, 1),  # two i1 tiles (blocks of 64); the input gradient contracts a1 = 65
    (2, 37, 35, 9, 2, 69, 330, 3, None),  # b1 = 35 and a1 = 37: several j1 chunks forward and backward (16 in fp32)
]


@pytest.mark.parametrize("rank, a1, b1, a2, b2, in_features, out_features, rows, block_n", SHAPES)
def test_kron_linear_matches_kron_reference_fp32(rank, a1, b1, a2, b2, in_features, out_features, rows, block_n):
    a, b, _ = random_case(rank, a1, b1, a2, b2)
    x = torch.randn(rows, in_features, device=DEVICE, requires_grad=True)
    check_against_reference(x, a, b, None, out_features, torch.float32, block_n)


def test_kpd_large_a1_small_blocks():
    """KPD 4x4 blocks with ``a1 = 300 > 256`` (BERT/T5 feed-forward-like, scaled down): tiled, not a fallback."""
    a, b, scale = random_case(2, 300, 5, 4, 4, with_scale=True, seed=13)
    x = torch.randn(3, 20, device=DEVICE, requires_grad=True)
    check_against_reference(x, a, b, scale, 1199, torch.float32)


@pytest.mark.parametrize("rows, rank_splits", [(1, 2), (8, 3), (5, 5)])
def test_rank_splits_sum_to_the_full_product(rows, rank_splits):
    """Decode-size batches split the rank over programs (5 terms in 2, 3 or 5 uneven splits), input gradient too."""
    a, b, scale = random_case(5, 6, 7, 5, 3, with_scale=True, seed=17)
    x = torch.randn(rows, 21, device=DEVICE, requires_grad=True)
    check_against_reference(x, a, b, scale, 29, torch.float32, rank_splits=rank_splits)


def test_kpd_scale_is_folded_in_with_its_gradient():
    a, b, scale = random_case(3, 4, 3, 2, 5, with_scale=True, seed=3)
    x = torch.randn(6, 15, device=DEVICE, requires_grad=True)
    check_against_reference(x, a, b, scale, 8, torch.float32, block_n=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("a1, b1, a2, b2", [(3, 5, 4, 3), (3, 35, 17, 3)])  # small (packed) and padded B_k
def test_half_precision_inputs_accumulate_in_fp32(dtype, a1, b1, a2, b2):
    skip_unless_dtype_runs(dtype)
    a, b, scale = random_case(2, a1, b1, a2, b2, dtype=dtype, with_scale=True, seed=5)
    x = torch.randn(5, b1 * b2, device=DEVICE).to(dtype).requires_grad_()
    check_against_reference(x, a, b, scale, a1 * a2 - 1, dtype, block_n=2)


def test_leading_dimensions_are_kept():
    a, b, _ = random_case(2, 3, 2, 2, 3, seed=11)
    x = torch.randn(2, 3, 6, device=DEVICE, requires_grad=True)
    check_against_reference(x, a, b, None, 6, torch.float32)


def test_empty_batch_gives_empty_output_and_zero_factor_gradients():
    a, b, scale = random_case(2, 3, 2, 2, 3, with_scale=True)
    x = torch.randn(0, 6, device=DEVICE, requires_grad=True)
    y = kron_linear(x, a, b, 5, scale=scale)
    assert y.shape == (0, 5)
    grads = torch.autograd.grad(y.sum(), (x, a, b, scale))
    assert grads[0].shape == (0, 6)
    for grad, tensor in zip(grads[1:], (a, b, scale)):
        assert grad.shape == tensor.shape and torch.equal(grad, torch.zeros_like(tensor))


def test_bad_factors_and_inputs_are_rejected():
    a, b, _ = random_case(2, 3, 2, 2, 3)
    with pytest.raises(ValueError, match="same rank"):
        kron_linear(torch.randn(1, 6), a, b[:1], 6)
    with pytest.raises(ValueError, match="at most b1 \\* b2 = 6"):
        kron_linear(torch.randn(1, 7), a, b, 6)
    with pytest.raises(ValueError, match="out_features must be in \\[0, a1 \\* a2 = 6\\], got 7"):
        kron_linear(torch.randn(1, 6), a, b, 7)
    with pytest.raises(ValueError, match="KPD scale S must have shape \\(3, 2\\)"):
        kron_linear(torch.randn(1, 6), a, b, 6, scale=torch.ones(2, 3))
