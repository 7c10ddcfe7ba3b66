"""Triton block-sparse matmul ``y = x W^T`` for ``W`` in BSR form, skipping the zero blocks (Zhu et al., section 4).

Program ``(rows, block row i, column tile)`` loops only over the stored blocks of block row ``i``
(``crow_indices[i] .. crow_indices[i + 1]``), so the cost is ``N * nnz * m2 * n2`` multiply-adds; block rows
without stored blocks write zeros. Forward only: the ``kron_transformers::block_sparse_matmul`` custom op
(``library_ops``) differentiates it by the PyTorch reference's block products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kron_linear import MIN_DOT_SIZE, _new_buffer, _precision


@triton.jit
def block_sparse_matmul_kernel(
    x_ptr, values_ptr, crow_ptr, col_ptr, y_ptr,
    n_rows, block_rows, block_cols, stride_xn, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``y[n, i * m2 + m] = sum_{z in row i} sum_c x[n, col[z] * n2 + c] V_z[m, c]`` for one tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    block_row = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.load(crow_ptr + block_row)
    end = tl.load(crow_ptr + block_row + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for z in range(start, end):
        block_col = tl.load(col_ptr + z)
        for k in range(0, block_cols, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            x_mask = (rows[:, None] < n_rows) & (offs_k[None, :] < block_cols)
            x_tile = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * stride_xn + block_col * block_cols + offs_k[None, :],
                mask=x_mask,
                other=0.0,
            )
            v_mask = (offs_k[:, None] < block_cols) & (offs_m[None, :] < block_rows)
            v_tile = tl.load(
                values_ptr + (z * block_rows + offs_m[None, :]).to(tl.int64) * block_cols + offs_k[:, None],
                mask=v_mask,
                other=0.0,
            )
            acc = tl.dot(x_tile, v_tile, acc, input_precision=PRECISION)
    mask = (rows[:, None] < n_rows) & (offs_m[None, :] < block_rows)
    out_ptr = y_ptr + rows[:, None].to(tl.int64) * stride_yn + block_row * block_rows + offs_m[None, :]
    tl.store(out_ptr, acc.to(y_ptr.dtype.element_ty), mask=mask)


NUM_WARPS = 8
MAX_TILE = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}  # 64-wide fp32 tiles spill (IEEE FMA dot)


def launch_blocks(
    block_rows: int, block_cols: int, n_rows: int, dtype: torch.dtype, block_n: int | None = None
) -> dict[str, int]:
    """Tile sizes (constexprs): rows, block rows and block columns, each a power of two in ``[16, MAX_TILE]``."""
    cap = MAX_TILE[dtype]
    return dict(
        BLOCK_N=block_n if block_n is not None else min(cap, max(MIN_DOT_SIZE, triton.next_power_of_2(n_rows))),
        BLOCK_M=min(max(MIN_DOT_SIZE, triton.next_power_of_2(block_rows)), cap),
        BLOCK_K=min(max(MIN_DOT_SIZE, triton.next_power_of_2(block_cols)), cap),
    )


def block_sparse_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    block_n: int | None = None,
) -> torch.Tensor:
    """Same contract as ``block_sparse_ops.block_sparse_matmul``, by the Triton kernel."""
    _, block_rows, block_cols = values.shape
    in_features = x.shape[-1]
    if out_features % block_rows or in_features % block_cols:
        raise ValueError(
            f"block_sparse_matmul: blocks {(block_rows, block_cols)} do not tile a {out_features}x{in_features} "
            "weight; rows and columns must be multiples of the block size"
        )
    lead_shape = x.shape[:-1]
    flat = x.reshape(-1, in_features).contiguous()
    n_rows = flat.shape[0]
    y = _new_buffer((n_rows, out_features), x.dtype, x.device)
    if n_rows and out_features:
        blocks = launch_blocks(block_rows, block_cols, n_rows, x.dtype, block_n)
        grid = (
            triton.cdiv(n_rows, blocks["BLOCK_N"]),
            out_features // block_rows,
            triton.cdiv(block_rows, blocks["BLOCK_M"]),
        )
        block_sparse_matmul_kernel[grid](
            flat, values.contiguous(), crow_indices.contiguous(), col_indices.contiguous(), y,
            n_rows, block_rows, block_cols, flat.stride(0), y.stride(0),
            PRECISION=_precision(x.dtype), num_warps=NUM_WARPS, **blocks,
        )  # fmt: skip
    return y.reshape(*lead_shape, out_features)
