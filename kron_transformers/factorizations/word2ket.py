"""word2ket: one order-n, rank-r tensor per token (Panahi, section 3.3.3, eq. 3.3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..kernels import kron_vectors_tree
from .base import Factorization, register_factorization
from .decompositions import cp_als, truncated_svd_factors


@register_factorization
class Word2KetFactorization(Factorization):
    """Row ``v = sum_{k=1..r} v_1k ⊗ v_2k ⊗ ... ⊗ v_nk`` with ``v_jk in R^{q_j}`` per token.

    The product is evaluated as a balanced binary tree (Panahi, 3.3.3); with
    ``layer_norm=True`` a LayerNorm is applied at every internal node of the tree, per rank
    term, as the paper proposes (the public reference leaves them commented out, so it is
    off by default). ``prod q_j >= cols``; extra columns are cropped. Leaves are stored as
    ``leaves[j]`` of shape ``(rows, r, q_j)``.
    """

    kind = "word2ket"

    def __init__(self, rows: int, cols: int, leaf_dims: Sequence[int], rank: int, layer_norm: bool = False) -> None:
        super().__init__(rows, cols)
        dims = tuple(int(q) for q in leaf_dims)
        if len(dims) < 2 or math.prod(dims) < cols or min(dims) < 1:
            raise ValueError(
                f"Word2Ket: leaf dims {dims} must be >= 2 positive sizes whose product covers the "
                f"embedding dimension {cols}"
            )
        if rank < 1:
            raise ValueError(f"Word2Ket: rank must be >= 1, got {rank}")
        self.leaf_dims = dims
        self.rank = int(rank)
        self.layer_norm = bool(layer_norm)
        self.leaves = nn.ParameterList(nn.Parameter(torch.empty(rows, rank, q)) for q in dims)
        self.norms = nn.ModuleList(nn.LayerNorm(size) for size in self._internal_node_sizes()) if layer_norm else None
        self.reset_random(1.0)

    def _internal_node_sizes(self) -> list[int]:
        """Sizes of the tree's internal nodes, level by level, in ``kron_vectors_tree`` order."""
        sizes, nodes = [], list(self.leaf_dims)
        while len(nodes) > 1:
            merged = [a * b for a, b in zip(nodes[0::2], nodes[1::2])] + ([nodes[-1]] if len(nodes) % 2 else [])
            sizes.extend(a * b for a, b in zip(nodes[0::2], nodes[1::2]))
            nodes = merged
        return sizes

    def _tree_rows(self, ids: torch.Tensor) -> torch.Tensor:
        leaves = [leaf[ids] for leaf in self.leaves]  # (..., r, q_j)
        return kron_vectors_tree(leaves, self.norms)

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._tree_rows(ids).sum(-2)[..., : self.cols]

    def materialize(self) -> torch.Tensor:
        return self.gather_rows(torch.arange(self.rows, device=self.leaves[0].device))

    def structure(self) -> dict[str, Any]:
        return {
            "factorization": self.kind,
            "leaf_dims": list(self.leaf_dims),
            "rank": self.rank,
            "layer_norm": self.layer_norm,
        }

    @torch.no_grad()
    def reset_random(self, std: float) -> None:
        """Leaves ``N(0, s^2)``, ``s = (std^2 / r)^(1/2n)``; with LayerNorm, the root's gain is ``std / sqrt(r)``."""
        order = len(self.leaf_dims)
        leaf_std = (std**2 / self.rank) ** (1.0 / (2 * order))
        for leaf in self.leaves:
            leaf.normal_(0.0, leaf_std)
        if self.norms is not None:
            for norm in self.norms:
                norm.reset_parameters()
            self.norms[-1].weight.fill_(std / math.sqrt(self.rank))

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> float:
        """Per-row rank-r CP of each row reshaped to ``(q_1, ..., q_n)``: SVD for n = 2, CP-ALS above."""
        if self.norms is not None:
            raise ValueError(
                "Word2Ket with layer_norm=True has no closed-form fit to a dense embedding (LayerNorm is not "
                "linear); use init='random' or layer_norm=False"
            )
        padded = weight.to(torch.float64).new_zeros(self.rows, math.prod(self.leaf_dims))
        padded[:, : self.cols] = weight.to(torch.float64)
        tensor = padded.reshape(self.rows, *self.leaf_dims)
        if len(self.leaf_dims) == 2:
            solution = truncated_svd_factors(tensor, self.rank)  # (rows, r, q_j) each
        else:
            solution = cp_als(tensor, self.rank)
        for leaf, value in zip(self.leaves, solution):
            leaf.copy_(value.to(leaf.dtype))
        return self.relative_error(weight)

    @torch.no_grad()
    def fit_row_weighted(self, weight: torch.Tensor, row_weights: torch.Tensor) -> bool:
        """Rows are independent, so the per-row fit is already optimal for any token frequencies."""
        if self.norms is not None:
            return False
        self.fit(weight)
        return True
