"""The table of dispatched ops (one ``register_kernel`` line each) and what each Triton kernel covers.

A new fused kernel is wired by naming it here, e.g.
``kron_gather_rows = register_kernel("kron_gather_rows", torch_ops.kron_gather_rows, "triton_gather:kron_gather_rows",
covers_kron_gather_rows)``; the factorizations keep calling the exported name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import block_sparse_ops, coverage, library_ops, tensor_train, torch_ops
from .dispatch import register_kernel


KRON_LINEAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def covers_kron_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], out_features: int) -> bool:
    """Order 2 and one supported dtype for ``x`` and the factors (any sizes: every dimension is tiled)."""
    return len(factors) == 2 and x.dtype in KRON_LINEAR_DTYPES and all(f.dtype == x.dtype for f in factors)


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
    """One supported dtype for ``x`` and the blocks (the backward is PyTorch's block products)."""
    return x.dtype in KRON_LINEAR_DTYPES and values.dtype == x.dtype


# ``auto`` policies, from bf16 on an H200 (benchmarks/backend_speed.py, 1,024 and 32,768 rows; time over the
# PyTorch path's, forward / forward+backward; benchmarks/RESULTS.md): kron_matmul 0.87/1.46 and 0.14/0.47,
# block_sparse_matmul 0.24/0.86 and 0.09/0.72, tt_embedding_bag 0.63/1.65 and 0.80/0.75: always. kpd_matmul
# 1.12/1.65 and 3.07/7.69: never. The row gathers' backward loses (kron_gather_rows order 2: 1.00/2.11 and
# 0.89/2.03; tt_gather_rows 0.59/1.71 and 1.36/1.33): inference only.
kron_matmul = register_kernel(
    "kron_matmul", torch_ops.kron_matmul, "library_ops:kron_matmul", covers_kron_matmul, library_ops.kron_matmul
)
kpd_matmul = register_kernel(
    "kpd_matmul",
    torch_ops.kpd_matmul,
    "library_ops:kpd_matmul",
    covers_kpd_matmul,
    library_ops.kpd_matmul,
    auto="never",
)
kron_gather_rows = register_kernel(
    "kron_gather_rows",
    torch_ops.kron_gather_rows,
    "triton_gather:kron_gather_rows_triton",
    coverage.kron_gather_rows_covers,
    library_ops.kron_gather_rows,
    auto="inference",
)
block_sparse_matmul = register_kernel(
    "block_sparse_matmul",
    block_sparse_ops.block_sparse_matmul,
    "library_ops:block_sparse_matmul",
    covers_block_sparse_matmul,
    library_ops.block_sparse_matmul,
)
tt_gather_rows = register_kernel(
    "tt_gather_rows",
    tensor_train.tt_gather_rows,
    "triton_tensor_train:tt_gather_rows_triton",
    coverage.tt_gather_rows_covers,
    library_ops.tt_gather_rows,
    auto="inference",
)
tt_embedding_bag = register_kernel(
    "tt_embedding_bag",
    tensor_train.tt_embedding_bag,
    "triton_tensor_train:tt_embedding_bag_triton",
    coverage.tt_embedding_bag_covers,
    library_ops.tt_embedding_bag,
)
