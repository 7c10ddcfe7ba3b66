"""Clustered Compositional Embeddings (CCE, Tsang & Ahle, Algorithm 3 and appendix D-G).

The ``(rows, cols)`` table is split into ``c`` column blocks ("columns"); block ``j`` of row
``i`` is ``M_j[h_j(i)] + M'_j[h'_j(i)]`` with two small tables ``M_j, M'_j`` of ``m`` rows and
two pointer functions ``h_j, h'_j: [rows] -> [m]``. Pointers start as universal hashes; a
clustering (k-means on the current rows of block ``j``) replaces ``h_j`` by the cluster ids
and ``M_j`` by the centroids, re-hashes ``h'_j`` and resets ``M'_j`` (Algorithm 3).
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import torch
from torch import nn

from .base import Factorization, register_factorization
from .kmeans import kmeans


MERSENNE_PRIME = 2**31 - 1  # Carter-Wegman modulus; ids must be below it
HELPER_INITS = ("zero", "residual")


def column_widths(cols: int, num_columns: int) -> list[int]:
    """Widths of the ``num_columns`` blocks of a ``cols``-wide row: as equal as possible, wider blocks first.

    ``cols = 10, num_columns = 4`` gives ``[3, 3, 2, 2]``.
    """
    if not 1 <= num_columns <= cols:
        raise ValueError(f"CCE: num_columns must be in [1, {cols}] for embedding dimension {cols}, got {num_columns}")
    base, extra = divmod(cols, num_columns)
    return [base + 1] * extra + [base] * (num_columns - extra)


def default_table_rows(num_embeddings: int) -> int:
    """``ceil(sqrt(num_embeddings))`` rows per table: ``m^(2c)`` codes for ``c`` columns, far more than the ids.

    ``2 m d`` parameters instead of ``n d``: 87x smaller for BERT's 30522 x 768, 500x for 10^6 rows.
    """
    return max(1, min(num_embeddings, math.ceil(math.sqrt(num_embeddings))))


def universal_hash(num_ids: int, buckets: int, num_functions: int, seed: int, device=None) -> torch.Tensor:
    """``(num_ids, num_functions)`` int32 pointers ``h_f(x) = ((a_f x + b_f) mod p) mod buckets``.

    Carter-Wegman universal hashing (Tsang & Ahle, appendix C) with ``p = 2^31 - 1``,
    ``a_f in [1, p)``, ``b_f in [0, p)`` drawn from ``seed``; products stay below ``2^62``.
    """
    if num_ids > MERSENNE_PRIME:
        raise ValueError(f"universal_hash: at most {MERSENNE_PRIME} ids can be hashed, got {num_ids}")
    rng = random.Random(seed)
    ids = torch.arange(num_ids, dtype=torch.int64, device=device)
    columns = []
    for _ in range(num_functions):
        a, b = rng.randrange(1, MERSENNE_PRIME), rng.randrange(0, MERSENNE_PRIME)
        columns.append(((a * ids + b) % MERSENNE_PRIME) % buckets)
    return torch.stack(columns, dim=-1).to(torch.int32)


@register_factorization
class CCEFactorization(Factorization):
    """CCE table: row ``i`` is ``concat_j (M_j[h_j(i)] + M'_j[h'_j(i)])`` (Tsang & Ahle, Algorithm 3).

    ``table`` (``M``) and ``helper_table`` (``M'``) are ``(table_rows, cols)`` Parameters whose
    column block ``j`` is ``M_j`` / ``M'_j``; ``pointers`` (``h``) and ``helper_pointers``
    (``h'``) are ``(rows, num_columns)`` int32 buffers, saved in checkpoints and never trained.
    ``2 * table_rows * cols`` parameters. When ``cols`` is not divisible by ``num_columns`` the
    first ``cols mod num_columns`` blocks are one entry wider (``column_widths``).
    """

    kind = "cce"

    def __init__(self, rows: int, cols: int, num_columns: int, table_rows: int, seed: int = 0) -> None:
        super().__init__(rows, cols)
        self.widths = column_widths(cols, num_columns)
        if not 1 <= table_rows <= rows:
            raise ValueError(f"CCE: table_rows must be in [1, {rows}] for a table of {rows} rows, got {table_rows}")
        self.num_columns = int(num_columns)
        self.table_rows = int(table_rows)
        self.seed = int(seed)
        self.table = nn.Parameter(torch.empty(table_rows, cols))
        self.helper_table = nn.Parameter(torch.empty(table_rows, cols))
        hashed = universal_hash(rows, table_rows, 2 * num_columns, seed, device=self.table.device)
        self.register_buffer("pointers", hashed[:, :num_columns].contiguous())
        self.register_buffer("helper_pointers", hashed[:, num_columns:].contiguous())
        self.reset_random(1.0)

    def column_slices(self) -> list[slice]:
        """The ``cols`` range of each block."""
        bounds = [0, *itertools.accumulate(self.widths)]
        return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def _entry_pointers(self, pointers: torch.Tensor) -> torch.Tensor:
        """``(n, c)`` block pointers -> ``(n, cols)`` row index of every entry (for ``Tensor.gather``)."""
        blocks = [j for j, width in enumerate(self.widths) for _ in range(width)]
        block_of_entry = torch.tensor(blocks, device=pointers.device)
        return pointers.long().index_select(-1, block_of_entry)

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.table.gather(0, self._entry_pointers(self.pointers[flat])) + self.helper_table.gather(
            0, self._entry_pointers(self.helper_pointers[flat])
        )
        return rows.reshape(*ids.shape, self.cols)

    def materialize(self) -> torch.Tensor:
        return self.gather_rows(torch.arange(self.rows, device=self.pointers.device))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` as ``sum_j (x_j M_j^T)[:, h_j] + (x_j M'_j^T)[:, h'_j]``: ``O(m cols + 2 c rows)`` per vector.

        Cheaper than the dense ``O(rows * cols)`` product whenever ``2 c < cols``; otherwise the
        table is materialized.
        """
        if 2 * self.num_columns >= self.cols:
            return x @ self.materialize().T
        logits = None
        for j, block in enumerate(self.column_slices()):
            for table, pointers in ((self.table, self.pointers), (self.helper_table, self.helper_pointers)):
                scores = (x[..., block] @ table[:, block].T).index_select(-1, pointers[:, j].long())
                logits = scores if logits is None else logits + scores
        return logits

    def structure(self) -> dict[str, Any]:
        return {
            "factorization": self.kind,
            "num_columns": self.num_columns,
            "table_rows": self.table_rows,
            "seed": self.seed,
        }

    @torch.no_grad()
    def reset_random(self, std: float) -> None:
        """``M, M'`` entries ``N(0, std^2 / 2)``, so each table entry ``M + M'`` has variance ``std^2``."""
        self.table.normal_(0.0, std / math.sqrt(2))
        self.helper_table.normal_(0.0, std / math.sqrt(2))

    @torch.no_grad()
    def cluster_table(
        self,
        table: torch.Tensor,
        *,
        backend: str = "auto",
        niter: int = 50,
        max_points_per_centroid: int = 256,
        seed: int = 0,
        helper_init: str = "zero",
    ) -> None:
        """One CCE clustering of a ``(rows, cols)`` table (Tsang & Ahle, Algorithm 3).

        Per block ``j``: k-means with ``table_rows`` centroids on ``table[:, block_j]``; ``h_j`` =
        cluster ids, ``M_j`` = centroids; ``h'_j`` re-hashed with a new universal hash from
        ``seed``; ``M'_j = 0`` (``helper_init="zero"``, the paper) or the mean k-means residual of
        the rows in each ``h'_j`` bucket (``"residual"``, the least-squares ``M'_j`` for fixed
        ``M_j``; the paper's appendix A "smarter initialization"), empty buckets zero.
        """
        if tuple(table.shape) != (self.rows, self.cols):
            raise ValueError(f"CCE: cluster_table needs a ({self.rows}, {self.cols}) table, got {tuple(table.shape)}")
        if helper_init not in HELPER_INITS:
            raise ValueError(f"CCE: helper_init must be one of {HELPER_INITS}, got {helper_init!r}")
        table = table.detach().to(self.table.device, self.table.dtype)
        helper = universal_hash(self.rows, self.table_rows, self.num_columns, seed, device=self.pointers.device)
        for j, block in enumerate(self.column_slices()):
            points = table[:, block]
            centroids, assignment = kmeans(
                points,
                self.table_rows,
                backend=backend,
                niter=niter,
                max_points_per_centroid=max_points_per_centroid,
                seed=seed + j,
            )
            self.table[:, block] = centroids
            self.pointers[:, j] = assignment.to(torch.int32)
            self.helper_pointers[:, j] = helper[:, j]
            self.helper_table[:, block] = 0.0
            if helper_init == "residual":
                buckets = helper[:, j].long()
                residual = points - centroids[assignment]
                sums = torch.zeros_like(centroids).index_add_(0, buckets, residual)
                counts = torch.bincount(buckets, minlength=self.table_rows).clamp_min(1).unsqueeze(-1)
                self.helper_table[:, block] = sums / counts.to(sums.dtype)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> float:
        """Cluster the dense table (k-means per block, residual helper tables); returns the relative error."""
        self.cluster_table(weight, seed=self.seed, helper_init="residual")
        return self.relative_error(weight)
