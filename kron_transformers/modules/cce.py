"""``CCEEmbedding`` / ``CCEEmbeddingBag``: clustered compositional embeddings, drop-in for ``nn.Embedding(Bag)``.

Seed 002: row ``i`` is ``concat_j (M_j[h_j(i)] + M'_j[h'_j(i)])`` over ``c`` column blocks;
``kt.cce.cluster`` (or a ``ClusterSchedule``) replaces the hashed pointers ``h_j`` by k-means
cluster ids during training.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..cce import ClusteringHook
from ..factorizations.cce import CCEFactorization, default_table_rows
from .bag import BAG_MODES, embedding_bag_lookup
from .dense_view import dense_weight_property
from .embedding import EMBEDDING_CLASSES, FactorizedEmbedding, zero_index


logger = logging.getLogger(__name__)


def _cce_table(
    name: str, num_embeddings: int, embedding_dim: int, num_columns: int, table_rows: int | None, seed: int
) -> CCEFactorization:
    if table_rows is None:
        table_rows = default_table_rows(num_embeddings)
        logger.info(
            "%s(%d, %d): table_rows=%d chosen (%.1fx fewer parameters)",
            name,
            num_embeddings,
            embedding_dim,
            table_rows,
            num_embeddings / (2 * table_rows),
        )
    return CCEFactorization(num_embeddings, embedding_dim, num_columns, table_rows, seed)


class CCEEmbedding(ClusteringHook, FactorizedEmbedding):
    """Drop-in ``nn.Embedding`` with a CCE table (seed 002): ``2 * table_rows * embedding_dim`` parameters.

    ```py
    emb = CCEEmbedding(50000, 768)                        # 4 columns, table_rows = ceil(sqrt(50000)) = 224
    emb = CCEEmbedding(10**6, 64, num_columns=4, table_rows=1000, padding_idx=0)
    ```
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        num_columns: int = 4,
        table_rows: int | None = None,
        padding_idx: int | None = None,
        seed: int = 0,
    ) -> None:
        table = _cce_table(type(self).__name__, num_embeddings, embedding_dim, num_columns, table_rows, seed)
        super().__init__(table, padding_idx)


EMBEDDING_CLASSES[CCEFactorization] = CCEEmbedding


class CCEEmbeddingBag(ClusteringHook, nn.Module):
    """Drop-in ``nn.EmbeddingBag`` with a CCE table (seed 002).

    ``forward(input, offsets=None, per_sample_weights=None)`` pools the rows of each bag with
    ``nn.EmbeddingBag``'s rules (``mode`` sum/mean/max, ``padding_idx`` entries skipped,
    ``include_last_offset``, 2-D input = one bag per row); the rows of the unique ids of a
    batch are built once (``modules.bag.embedding_bag_lookup``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        num_columns: int = 4,
        table_rows: int | None = None,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in BAG_MODES:
            raise ValueError(f"CCEEmbeddingBag: mode must be one of {BAG_MODES}, got {mode!r}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"CCEEmbeddingBag: padding_idx {padding_idx} is outside the vocabulary of {num_embeddings} rows"
                )
            padding_idx %= num_embeddings
        self.factorization = _cce_table(
            type(self).__name__, num_embeddings, embedding_dim, num_columns, table_rows, seed
        )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.mode = mode
        self.padding_idx = padding_idx
        self.include_last_offset = include_last_offset

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return embedding_bag_lookup(
            self.factorization.gather_rows,
            self.embedding_dim,
            input,
            offsets,
            per_sample_weights,
            mode=self.mode,
            padding_idx=self.padding_idx,
            include_last_offset=self.include_last_offset,
            module_name=type(self).__name__,
        )

    def materialize(self) -> torch.Tensor:
        """Dense ``(num_embeddings, embedding_dim)`` table, padding row zero."""
        return zero_index(self.factorization.materialize(), self.padding_idx, 0)

    weight = dense_weight_property()

    def num_parameters(self) -> int:
        return self.factorization.num_parameters()

    def extra_repr(self) -> str:
        extra = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}{extra}"
