"""``CCEEmbedding`` / ``CCEEmbeddingBag``: clustered compositional embeddings, drop-in for ``nn.Embedding(Bag)``.

Tsang & Ahle: row ``i`` is ``concat_j (M_j[h_j(i)] + M'_j[h'_j(i)])`` over ``c`` column blocks;
``kt.cce.cluster`` (or a ``ClusterSchedule``) replaces the hashed pointers ``h_j`` by k-means
cluster ids during training.
"""

from __future__ import annotations

import logging

from ..cce import ClusteringHook
from ..factorizations.cce import CCEFactorization, default_table_rows
from .bag import FactorizedEmbeddingBag
from .embedding import EMBEDDING_CLASSES, FactorizedEmbedding


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
    """Drop-in ``nn.Embedding`` with a CCE table (Tsang & Ahle): ``2 * table_rows * embedding_dim`` parameters.

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


class CCEEmbeddingBag(ClusteringHook, FactorizedEmbeddingBag):
    """Drop-in ``nn.EmbeddingBag`` with a CCE table (Tsang & Ahle).

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
        table = _cce_table(type(self).__name__, num_embeddings, embedding_dim, num_columns, table_rows, seed)
        super().__init__(table, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset)
