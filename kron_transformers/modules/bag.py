"""``nn.EmbeddingBag`` semantics over a table that is gathered lazily, never formed.

Shared by the bag modules of every embedding compressor (TT-Rec, CCE, ...): the ids of a
batch are deduplicated, the rows of the unique ids are built once by the compressor's
``gather_rows``, and ``F.embedding_bag`` pools them over that small table. Each hot id is
therefore computed once per batch and its gradient reaches the factors as one summed row
(Yin et al., section 4.1, "unique indices"), with PyTorch's own pooling, offsets,
``per_sample_weights`` and ``padding_idx`` rules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..factorizations import Factorization
from .embedding import FactorizedTable, checked_padding_idx


BAG_MODES = ("sum", "mean", "max")


def check_bag_arguments(
    module_name: str,
    input: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    mode: str,
) -> None:
    """Raise the errors ``nn.EmbeddingBag`` would, naming ``module_name`` and what is accepted."""
    if mode not in BAG_MODES:
        raise ValueError(f"{module_name}: mode {mode!r} is not one of {BAG_MODES}")
    if input.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{module_name}: input must hold int32/int64 ids, got {input.dtype}")
    if input.dim() == 2 and offsets is not None:
        raise ValueError(
            f"{module_name}: offsets must be None for 2-D input of shape {tuple(input.shape)} (each row is a bag)"
        )
    if input.dim() == 1 and offsets is None:
        raise ValueError(f"{module_name}: 1-D input of shape {tuple(input.shape)} needs offsets (bag starts)")
    if input.dim() not in (1, 2):
        raise ValueError(f"{module_name}: input must be 1-D with offsets or 2-D (bags, ids), got {tuple(input.shape)}")
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(f"{module_name}: per_sample_weights are only supported with mode='sum', not {mode!r}")
        if per_sample_weights.shape != input.shape:
            raise ValueError(
                f"{module_name}: per_sample_weights of shape {tuple(per_sample_weights.shape)} must match the "
                f"input's shape {tuple(input.shape)}"
            )


def embedding_bag_lookup(
    gather_rows: Callable[[torch.Tensor], torch.Tensor],
    embedding_dim: int,
    input: torch.Tensor,
    offsets: torch.Tensor | None = None,
    per_sample_weights: torch.Tensor | None = None,
    *,
    mode: str = "mean",
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    module_name: str = "EmbeddingBag",
) -> torch.Tensor:
    """``bag_b = reduce_{i in bag b} w_i E[id_i]`` with ``E[unique ids] = gather_rows(unique ids)``.

    Entries equal to ``padding_idx`` are left out of every bag (and of ``mean``'s count), as
    ``nn.EmbeddingBag``: they point to an appended zero row that ``F.embedding_bag`` skips.
    """
    check_bag_arguments(module_name, input, offsets, per_sample_weights, mode)
    unique_ids, positions = torch.unique(input, return_inverse=True)
    table = gather_rows(unique_ids).reshape(len(unique_ids), embedding_dim)
    local_padding_idx = None
    if padding_idx is not None or len(unique_ids) == 0:  # F.embedding_bag needs a non-empty table
        table = torch.cat([table, table.new_zeros(1, embedding_dim)])
    if padding_idx is not None:
        local_padding_idx = len(unique_ids)
        positions = torch.where(input == padding_idx, local_padding_idx, positions)
    return F.embedding_bag(
        positions,
        table,
        offsets,
        mode=mode,
        per_sample_weights=per_sample_weights,
        include_last_offset=include_last_offset,
        padding_idx=local_padding_idx,
    )


class FactorizedEmbeddingBag(FactorizedTable):
    """Drop-in ``nn.EmbeddingBag`` over a factorized table (the bags of TT-Rec, CCE, ...).

    ``forward(input, offsets=None, per_sample_weights=None)`` pools the rows of each bag with
    ``nn.EmbeddingBag``'s rules (``mode`` sum/mean/max, ``padding_idx`` entries skipped,
    ``include_last_offset``, 2-D input = one bag per row); the rows of the distinct ids of a batch
    are built once by ``factorization.gather_rows`` (``embedding_bag_lookup``).
    """

    def __init__(
        self,
        factorization: Factorization,
        *,
        mode: str,
        padding_idx: int | None,
        include_last_offset: bool,
    ) -> None:
        super().__init__()
        if mode not in BAG_MODES:
            raise ValueError(f"{type(self).__name__}: mode {mode!r} is not one of {BAG_MODES}")
        self.factorization = factorization
        self.num_embeddings = factorization.rows
        self.embedding_dim = factorization.cols
        self.mode = mode
        self.padding_idx = checked_padding_idx(type(self).__name__, padding_idx, factorization.rows)
        self.include_last_offset = include_last_offset

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return embedding_bag_lookup(
            self.factorization.cached_gather_rows,
            self.embedding_dim,
            input,
            offsets,
            per_sample_weights,
            mode=self.mode,
            padding_idx=self.padding_idx,
            include_last_offset=self.include_last_offset,
            module_name=type(self).__name__,
        )

    def extra_repr(self) -> str:
        extra = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}{extra}"
