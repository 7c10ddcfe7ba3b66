"""PyTorch reference for ``x W^T`` with ``W`` in block-sparse row (BSR) form (Zhu et al., section 4, inference).

``W`` (``out x in``) is given by its non-zero blocks ``values (nnz, m2, n2)``, ``crow_indices`` (one entry per
block row, plus one) and ``col_indices (nnz)``, as ``torch.sparse_bsr_tensor`` stores it. Zero blocks cost
nothing: only the stored blocks are multiplied.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def _bsr_linear_supported(x: torch.Tensor, values: torch.Tensor) -> bool:
    """PyTorch's own BSR ``F.linear``: square blocks, fp32/fp64 and no gradient (CPU MKL and cuSPARSE limits)."""
    return (
        values.shape[1] == values.shape[2]
        and x.dtype in (torch.float32, torch.float64)
        and values.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad))
    )


def _block_row_of(crow_indices: torch.Tensor, nonzero_blocks: int) -> torch.Tensor:
    """The block row ``i`` of each stored block ``z`` (``crow_indices[i] <= z < crow_indices[i + 1]``)."""
    block_rows = torch.arange(len(crow_indices) - 1, device=crow_indices.device)
    return torch.repeat_interleave(block_rows, crow_indices.diff(), output_size=nonzero_blocks)


def block_sparse_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """``x (..., in) @ W^T -> (..., out_features)`` for ``W`` in BSR form.

    PyTorch's BSR ``F.linear`` where it supports the arguments; otherwise each stored block ``V_z`` at block
    ``(i, j)`` adds ``x[:, j-th column block] V_z^T`` to output block ``i`` (a gather, one batched product and
    an ``index_add`` over block rows), which also differentiates with respect to ``x`` and ``values``.
    """
    nonzero_blocks, block_rows, block_cols = values.shape
    in_features = x.shape[-1]
    if out_features % block_rows or in_features % block_cols:
        raise ValueError(
            f"block_sparse_matmul: blocks {(block_rows, block_cols)} do not tile a {out_features}x{in_features} "
            "weight; rows and columns must be multiples of the block size"
        )
    if _bsr_linear_supported(x, values):
        weight = torch.sparse_bsr_tensor(
            crow_indices, col_indices, values, (out_features, in_features), check_invariants=False
        )
        with warnings.catch_warnings():  # "BSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return F.linear(x, weight)
    lead_shape = x.shape[:-1]
    flat = x.reshape(-1, in_features // block_cols, block_cols)
    block_row_of = _block_row_of(crow_indices, nonzero_blocks)
    contributions = torch.einsum("nzc,zrc->nzr", flat[:, col_indices], values.to(x.dtype))
    out = x.new_zeros(flat.shape[0], out_features // block_rows, block_rows)
    out = out.index_add(1, block_row_of, contributions)
    return out.reshape(*lead_shape, out_features)


def block_sparse_matmul_backward(
    x: torch.Tensor,
    grad: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    needs_grad: tuple[bool, ...] = (True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dvalues)`` of ``y = x W^T`` given ``dy``, over the stored blocks only: block ``V_z`` at ``(i, j)`` adds
    ``dy[:, i-th row block] V_z`` to ``dx[:, j-th column block]`` and has ``dV_z = dy[:, i-th]^T x[:, j-th]``.
    ``needs_grad[:2]`` says which of the two to compute (``None`` for the other)."""
    nonzero_blocks, block_rows, block_cols = values.shape
    flat_x = x.reshape(-1, x.shape[-1] // block_cols, block_cols)
    flat_grad = grad.reshape(-1, grad.shape[-1] // block_rows, block_rows)
    grad_blocks = flat_grad[:, _block_row_of(crow_indices, nonzero_blocks)]  # (N, nnz, m2)
    grad_x = grad_values = None
    if needs_grad[0]:
        contributions = torch.einsum("nzr,zrc->nzc", grad_blocks, values.to(grad.dtype))
        grad_x = flat_x.new_zeros(flat_x.shape).index_add(1, col_indices, contributions.to(x.dtype)).reshape(x.shape)
    if needs_grad[1]:
        grad_values = torch.einsum("nzr,nzc->zrc", grad_blocks, flat_x[:, col_indices].to(grad.dtype))
        grad_values = grad_values.to(values.dtype)
    return grad_x, grad_values
