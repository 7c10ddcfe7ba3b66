"""Inference module holding a KPD layer's block-sparse dense weight (Zhu et al., section 4, inference)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..kernels import block_sparse_matmul
from .dense_view import dense_weight_property


class BlockSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as BSR blocks: only the non-zero blocks are kept and multiplied.

    Buffers ``values (nnz, m2, n2)``, ``crow_indices (rows/m2 + 1)`` and ``col_indices (nnz)`` are plain
    dense tensors (safetensors-friendly); the sparse BSR view is assembled on each call.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: tuple[int, int],
        nonzero_blocks: int,
        bias: bool = True,
        weight_layout: str = "linear",
    ) -> None:
        super().__init__()
        self.weight_layout = weight_layout
        block_rows, block_cols = block_size
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = (int(block_rows), int(block_cols))
        self.register_buffer("values", torch.zeros(nonzero_blocks, block_rows, block_cols))
        self.register_buffer("crow_indices", torch.zeros(out_features // block_rows + 1, dtype=torch.int64))
        self.register_buffer("col_indices", torch.zeros(nonzero_blocks, dtype=torch.int64))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        block_size: tuple[int, int],
        bias: torch.Tensor | None,
        weight_layout: str = "linear",
    ) -> BlockSparseLinear:
        """Keep the blocks of ``weight`` (out x in) that have any non-zero entry."""
        with warnings.catch_warnings():  # "BSR support is in beta": the conversion itself is exact
            warnings.simplefilter("ignore", UserWarning)
            sparse = weight.detach().to_sparse_bsr(tuple(block_size))
        module = cls(
            weight.shape[1], weight.shape[0], block_size, sparse.values().shape[0], bias is not None, weight_layout
        )
        module.to(weight.device, weight.dtype)
        module.values.copy_(sparse.values())
        module.crow_indices.copy_(sparse.crow_indices())
        module.col_indices.copy_(sparse.col_indices())
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone())
        return module

    def sparse_weight(self) -> torch.Tensor:
        return torch.sparse_bsr_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Only the stored blocks are multiplied (``kernels.block_sparse_matmul``: Triton on CUDA)."""
        output = block_sparse_matmul(x, self.values, self.crow_indices, self.col_indices, self.out_features)
        return output + self.bias if self.bias is not None else output

    def materialize(self) -> torch.Tensor:
        """Dense weight in the replaced module's convention (``(in, out)`` for a ``Conv1D``)."""
        dense = self.sparse_weight().to_dense()
        return dense.T if self.weight_layout == "conv1d" else dense

    weight = dense_weight_property(lambda module: (module.out_features, module.in_features))

    def num_nonzeros(self) -> int:
        """Stored weight entries (the non-zero blocks), the inference size of Zhu et al.'s tables."""
        return self.values.numel()

    def extra_repr(self) -> str:
        blocks = (self.out_features // self.block_size[0]) * (self.in_features // self.block_size[1])
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"nonzero_blocks={self.values.shape[0]}/{blocks}, bias={self.bias is not None}"
        )
