"""The table of dispatched ops (one ``register_kernel`` line each) and what each Triton kernel covers.

A new fused kernel is wired by naming it here, e.g.
``kron_gather_rows = register_kernel("kron_gather_rows", torch_ops.kron_gather_rows, "triton_gather:kron_gather_rows",
covers_kron_gather_rows)``; the factorizations keep calling the exported name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import block_sparse_ops, tensor_train, torch_ops
from .dispatch import register_kernel


KRON_LINEAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KRON_LINEAR_MAX_CONTRACTED = 256  # b1 (forward) and a1 (input gradient) are held whole in registers


def covers_kron_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], out_features: int) -> bool:
    """Order 2, one supported dtype for ``x`` and the factors, ``a1, b1 <= 256``."""
    if len(factors) != 2 or x.dtype not in KRON_LINEAR_DTYPES or any(f.dtype != x.dtype for f in factors):
        return False
    return max(factors[0].shape[1:]) <= KRON_LINEAR_MAX_CONTRACTED


def covers_kpd_matmul(
    x: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_features: int
) -> bool:
    """As ``covers_kron_matmul``, with ``S`` in the same dtype."""
    return scale.dtype == x.dtype and covers_kron_matmul(x, (a, b), out_features)


def covers_block_sparse_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
) -> bool:
    """Inference only (no gradient needed), one supported dtype for ``x`` and the blocks."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)
    return not needs_grad and x.dtype in KRON_LINEAR_DTYPES and values.dtype == x.dtype


kron_matmul = register_kernel(
    "kron_matmul", torch_ops.kron_matmul, "triton_kron_linear:kron_matmul", covers_kron_matmul
)
kpd_matmul = register_kernel("kpd_matmul", torch_ops.kpd_matmul, "triton_kron_linear:kpd_matmul", covers_kpd_matmul)
kron_gather_rows = register_kernel(
    "kron_gather_rows",
    torch_ops.kron_gather_rows,
    "triton_gather:kron_gather_rows_triton",
    "triton_gather:kron_gather_rows_covers",
)
block_sparse_matmul = register_kernel(
    "block_sparse_matmul",
    block_sparse_ops.block_sparse_matmul,
    "triton_block_sparse:block_sparse_matmul",
    covers_block_sparse_matmul,
)
tt_gather_rows = register_kernel(
    "tt_gather_rows",
    tensor_train.tt_gather_rows,
    "triton_tensor_train:tt_gather_rows_triton",
    "triton_tensor_train:tt_gather_rows_covers",
)
tt_embedding_bag = register_kernel(
    "tt_embedding_bag",
    tensor_train.tt_embedding_bag,
    "triton_tensor_train:tt_embedding_bag_triton",
    "triton_tensor_train:tt_embedding_bag_covers",
)
