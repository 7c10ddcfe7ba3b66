"""Triton block-sparse matmul ``y = x W^T`` for ``W`` in BSR form, skipping the zero blocks (Zhu et al., section 4).

Program ``(rows, block row i, column tile)`` loops only over the stored blocks of block row ``i``
(``crow_indices[i] .. crow_indices[i + 1]``), so the cost is ``N * nnz * m2 * n2`` multiply-adds; block rows
without stored blocks write zeros. Blocks of at least 16 in either side go through ``tl.dot`` tiles (whose sides are
at least 16); smaller blocks (KPD's 4x4) are packed instead of padded to 16: ``block_sparse_small_kernel`` gathers
``PACK`` stored blocks of the row at a time into one ``(BLOCK_N, PACK * n2)`` input tile and one
``(PACK * n2, m2)`` weight tile and reduces their product on the CUDA cores, so every multiply-add is used (sides
rounded up to a power of two only: 3x3 runs as 4x4). Forward only: the ``kron_transformers::block_sparse_matmul``
custom op (``library_ops``) differentiates it by the PyTorch reference's block products.
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


@triton.jit
def block_sparse_small_kernel(
    x_ptr, values_ptr, crow_ptr, col_ptr, y_ptr,
    n_rows, block_rows, block_cols, stride_xn, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PACK: tl.constexpr,
):  # fmt: skip
    """``y[n, i * m2 + m] = sum_{z in row i} sum_c x[n, col[z] * n2 + c] V_z[m, c]``, ``PACK`` blocks per step."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    block_row = tl.program_id(1)
    start = tl.load(crow_ptr + block_row)
    end = tl.load(crow_ptr + block_row + 1)
    packed = tl.arange(0, PACK * BLOCK_C)  # (block p of the step, column c of the block)
    slot, cols = packed // BLOCK_C, packed % BLOCK_C
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for first in range(start, end, PACK):
        z = first + slot
        k_mask = (z < end) & (cols < block_cols)
        block_col = tl.load(col_ptr + z, mask=z < end, other=0)
        x_tile = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xn + (block_col * block_cols + cols)[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        v_tile = tl.load(
            values_ptr + (z[:, None] * block_rows + offs_m[None, :]).to(tl.int64) * block_cols + cols[:, None],
            mask=k_mask[:, None] & (offs_m < block_rows)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(x_tile[:, :, None] * v_tile[None, :, :], axis=1)
    mask = row_mask[:, None] & (offs_m[None, :] < block_rows)
    out_ptr = y_ptr + rows[:, None].to(tl.int64) * stride_yn + block_row * block_rows + offs_m[None, :]
    tl.store(out_ptr, acc.to(y_ptr.dtype.element_ty), mask=mask)


NUM_WARPS = 8
MAX_TILE = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}  # 64-wide fp32 tiles spill (IEEE FMA dot)
SMALL_BLOCK = MIN_DOT_SIZE  # blocks with both sides below this are packed (block_sparse_small_kernel)
SMALL_NUM_WARPS = 4
_SMALL_PACKED_COLS = 32  # PACK * n2 (rounded up): the input columns of one step
_SMALL_TILE_ELEMENTS = 4096  # of the (BLOCK_N, PACK * n2, m2) product tile


def uses_small_kernel(block_rows: int, block_cols: int) -> bool:
    """Whether blocks of this size are packed (both sides below 16) rather than padded into ``tl.dot`` tiles."""
    return block_rows < SMALL_BLOCK and block_cols < SMALL_BLOCK


def small_launch_blocks(block_rows: int, block_cols: int, n_rows: int, block_n: int | None = None) -> dict[str, int]:
    """Constexprs of ``block_sparse_small_kernel``: block sides rounded up to powers of two, ``PACK`` blocks per
    step (``PACK * n2 = 32`` input columns) and as many rows as keep the product tile at 4096 elements."""
    block_m, block_c = triton.next_power_of_2(block_rows), triton.next_power_of_2(block_cols)
    pack = max(1, _SMALL_PACKED_COLS // block_c)
    most_rows = _SMALL_TILE_ELEMENTS // (pack * block_c * block_m)
    rows = block_n if block_n is not None else min(most_rows, max(2, triton.next_power_of_2(n_rows)))
    return dict(BLOCK_N=rows, BLOCK_M=block_m, BLOCK_C=block_c, PACK=pack)


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
    if n_rows and out_features and uses_small_kernel(block_rows, block_cols):
        blocks = small_launch_blocks(block_rows, block_cols, n_rows, block_n)
        block_sparse_small_kernel[(triton.cdiv(n_rows, blocks["BLOCK_N"]), out_features // block_rows)](
            flat, values.contiguous(), crow_indices.contiguous(), col_indices.contiguous(), y,
            n_rows, block_rows, block_cols, flat.stride(0), y.stride(0),
            num_warps=SMALL_NUM_WARPS, **blocks,
        )  # fmt: skip
    elif n_rows and out_features:
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
