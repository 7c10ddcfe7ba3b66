"""Block-sparse ``x W^T``: PyTorch reference and Triton kernel vs the dense float64 product."""

from __future__ import annotations

import pytest
import torch

from kron_transformers.kernels import block_sparse_ops
from kron_transformers.modules import BlockSparseLinear


pytestmark = pytest.mark.filterwarnings("ignore:Sparse:UserWarning")  # "BSR support is in beta", invariant checks
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def block_sparse_weight(rows, cols, block, keep, seed=0, dtype=torch.float64):
    """Random ``(rows, cols)`` weight with the blocks where ``keep`` is False zeroed, and its BSR parts."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    mask = torch.tensor(keep).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    weight = (weight * mask).to(DEVICE, dtype)
    sparse = weight.to_sparse_bsr(block)
    return weight, sparse.values(), sparse.crow_indices(), sparse.col_indices()


# block row 1 is empty (its output must still be written as zeros), block column 0 is used twice
KEEP = [[True, False, True], [False, False, False], [True, True, False]]


@pytest.mark.parametrize("block", [(3, 3), (2, 5)])  # square: PyTorch BSR F.linear; non-square: gather path
def test_reference_matches_dense(block):
    weight, values, crow, col = block_sparse_weight(3 * block[0], 3 * block[1], block, KEEP)
    x = torch.randn(4, 3 * block[1], dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        output = block_sparse_ops.block_sparse_matmul(x, values, crow, col, weight.shape[0])
    torch.testing.assert_close(output, x @ weight.T)


def test_reference_gradients_match_dense():
    weight, values, crow, col = block_sparse_weight(6, 9, (2, 3), KEEP, seed=1)
    values = values.clone().requires_grad_()
    x = torch.randn(2, 5, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    output = block_sparse_ops.block_sparse_matmul(x, values, crow, col, 6)
    dense = torch.sparse_bsr_tensor(crow, col, values, (6, 9)).to_dense()
    expected = x @ dense.T
    torch.testing.assert_close(output, expected)
    grad_out = torch.randn_like(output)
    for grad, expected_grad in zip(
        torch.autograd.grad(output, (x, values), grad_out), torch.autograd.grad(expected, (x, values), grad_out)
    ):
        torch.testing.assert_close(grad, expected_grad)


def test_reference_rejects_blocks_that_do_not_tile():
    _, values, crow, col = block_sparse_weight(6, 9, (2, 3), KEEP)
    with pytest.raises(ValueError, match="do not tile a 6x10 weight"):
        block_sparse_ops.block_sparse_matmul(torch.randn(1, 10, dtype=torch.float64), values, crow, col, 6)


def test_block_sparse_linear_non_square_blocks_and_bias():
    """``BlockSparseLinear`` goes through the dispatched op, so non-square blocks work on CPU too."""
    weight, *_ = block_sparse_weight(6, 15, (2, 5), KEEP, seed=2, dtype=torch.float32)
    bias = torch.randn(6, device=DEVICE)
    module = BlockSparseLinear.from_dense(weight, (2, 5), bias)
    x = torch.randn(3, 15, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(module(x), x @ weight.T + bias, rtol=1e-5, atol=1e-5)
    assert module.num_nonzeros() == 4 * 10


class TestTritonBlockSparse:
    @pytest.fixture(autouse=True)
    def triton_module(self, monkeypatch):
        pytest.importorskip("triton")
        from kron_transformers.kernels import triton_block_sparse

        def poisoned(shape, dtype, device):  # an unwritten output tile stays NaN and fails the comparison
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

        monkeypatch.setattr(triton_block_sparse, "_new_buffer", poisoned)
        return triton_block_sparse

    @pytest.mark.parametrize(
        "block, rows, block_n",
        [((3, 3), 1, None), ((2, 5), 7, 2), ((65, 65), 3, None)],  # (65, 65): two m tiles and two k chunks of 64
    )
    def test_matches_dense_and_skips_zero_blocks(self, triton_module, block, rows, block_n):
        weight, values, crow, col = block_sparse_weight(3 * block[0], 3 * block[1], block, KEEP, dtype=torch.float32)
        x = torch.randn(rows, 3 * block[1], device=DEVICE)
        output = triton_module.block_sparse_matmul(x, values, crow, col, weight.shape[0], block_n=block_n)
        assert not torch.isnan(output).any()
        torch.testing.assert_close(output.double(), x.double() @ weight.double().T, rtol=1e-4, atol=1e-4)
        assert torch.equal(output[:, block[0] : 2 * block[0]], torch.zeros(rows, block[0], device=DEVICE))

    @pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
    def test_small_blocks_are_packed_over_several_steps(self, triton_module, dtype, tolerance):
        """4x4 blocks (KPD presets): 8 blocks per step of ``block_sparse_small_kernel``, 11 stored in one row."""
        keep = torch.rand(3, 13, generator=torch.Generator().manual_seed(5)) < 0.7
        keep[0] = True
        keep[1] = False
        weight, values, crow, col = block_sparse_weight(12, 52, (4, 4), keep.tolist(), seed=6, dtype=dtype)
        assert triton_module.uses_small_kernel(4, 4) and not triton_module.uses_small_kernel(4, 16)
        assert triton_module.small_launch_blocks(4, 4, 5)["PACK"] == 8 and crow.diff().max() > 8
        x = torch.randn(5, 52, device=DEVICE).to(dtype)
        output = triton_module.block_sparse_matmul(x, values, crow, col, 12)
        assert not torch.isnan(output).any()
        expected = x.double() @ weight.double().T
        torch.testing.assert_close(output.double(), expected, rtol=tolerance, atol=tolerance)
        assert torch.equal(output[:, 4:8], torch.zeros(5, 4, dtype=dtype, device=DEVICE))

    @pytest.mark.parametrize("block", [(4, 4), (2, 20)])  # packed kernel; tl.dot tiles
    def test_custom_op_gradients_equal_the_reference(self, triton_module, block):
        """``library_ops.block_sparse_matmul``: the kernel forward and the block-product backward, 3-d input."""
        from kron_transformers.kernels import library_ops

        weight, values, crow, col = block_sparse_weight(3 * block[0], 3 * block[1], block, KEEP, seed=7)
        values = values.float().requires_grad_()
        x = torch.randn(2, 3, 3 * block[1], device=DEVICE, requires_grad=True)
        output = library_ops.block_sparse_matmul(x, values, crow, col, 3 * block[0])
        expected = block_sparse_ops.block_sparse_matmul(x, values, crow, col, 3 * block[0])
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(output)
        for actual, wanted in zip(
            torch.autograd.grad(output, (x, values), grad), torch.autograd.grad(expected, (x, values), grad)
        ):
            torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)

    def test_fp16_and_leading_dimensions(self, triton_module):
        weight, values, crow, col = block_sparse_weight(6, 15, (2, 5), KEEP, seed=4, dtype=torch.float16)
        x = torch.randn(2, 3, 15, device=DEVICE).half()
        output = triton_module.block_sparse_matmul(x, values, crow, col, 6)
        assert output.shape == (2, 3, 6) and output.dtype == torch.float16
        torch.testing.assert_close(output.double(), x.double() @ weight.double().T, rtol=2e-2, atol=2e-2)

    def test_empty_batch(self, triton_module):
        _, values, crow, col = block_sparse_weight(6, 15, (2, 5), KEEP, dtype=torch.float32)
        assert triton_module.block_sparse_matmul(torch.randn(0, 15, device=DEVICE), values, crow, col, 6).shape == (
            0,
            6,
        )


def test_kernel_compiles_for_cuda_without_spills():
    """sm_90 ahead of time (no GPU needed), at the launcher's tiles for the block sizes of every KPD preset and
    BERT/Llama KPD layer (4x4: the packed kernel) and for 64x64 blocks (``tl.dot`` tiles), at 1, 8 and 4096 rows,
    fp32/fp16/bf16: no register spills."""
    pytest.importorskip("triton")
    from cuda_compile import compile_for_cuda
    from kernel_shapes import large_layer_shapes, preset_shapes

    from kron_transformers.kernels import triton_block_sparse as kernel

    blocks = {(shape.a2, shape.b2) for shape in preset_shapes() + large_layer_shapes() if shape.kpd} | {(64, 64)}
    assert (4, 4) in blocks
    kernels = []
    for dtype, name, precision in ((torch.float32, "fp32", "ieee"), (torch.float16, "fp16", "tf32"),
                                   (torch.bfloat16, "bf16", "tf32")):  # fmt: skip
        pointers = dict(x_ptr=f"*{name}", values_ptr=f"*{name}", crow_ptr="*i64", col_ptr="*i64", y_ptr=f"*{name}")
        scalars = dict.fromkeys(["n_rows", "block_rows", "block_cols", "stride_xn", "stride_yn"], "i32")
        configs = set()
        for block_rows, block_cols in sorted(blocks):
            for rows in (1, 8, 4096):
                if kernel.uses_small_kernel(block_rows, block_cols):
                    constexprs = kernel.small_launch_blocks(block_rows, block_cols, rows)
                    configs.add(("block_sparse_small_kernel", tuple(constexprs.items()), kernel.SMALL_NUM_WARPS))
                else:
                    constexprs = dict(kernel.launch_blocks(block_rows, block_cols, rows, dtype), PRECISION=precision)
                    configs.add(("block_sparse_matmul_kernel", tuple(constexprs.items()), kernel.NUM_WARPS))
        for kernel_name, constexprs, warps in sorted(configs):
            kernels.append((kernel.__name__, kernel_name, pointers | scalars, dict(constexprs), {"num_warps": warps}))
    usage = compile_for_cuda(kernels)
    print("\nblock-sparse kernels:", [(k[1], k[3], u) for k, u in zip(kernels, usage)])
    assert [used["stack"] for used in usage] == [0] * len(kernels), usage
    assert any(k[1] == "block_sparse_small_kernel" for k in kernels)
