"""Pure-PyTorch reference ops for tensor-train (TT-matrix) tables (Yin et al., section 2 eq. 2, section 3.1 eq. 3).

A ``(rows, cols)`` table is held as ``d`` cores, ``cores[k]`` of shape ``(R_{k-1}, m_k, n_k, R_k)``
with ``R_0 = R_d = 1``. Row ``i = (i_1..i_d)`` (mixed radix over ``m_1..m_d``, ``i_1`` most
significant) and column ``j = (j_1..j_d)`` (over ``n_1..n_d``, ``j_1`` most significant) hold

    W[i, j] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]

(a ``1 x 1`` product of ``R_{k-1} x R_k`` matrices), on the padded ``prod m x prod n`` grid
cropped to ``(rows, cols)`` (REFERENCES.md section 0 and 5). These are the op boundaries a fused
kernel replaces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .torch_ops import mixed_radix_digits


def _check_cores(cores: Sequence[torch.Tensor], owner: str) -> None:
    if len(cores) < 2:
        raise ValueError(f"{owner}: need at least 2 TT cores, got {len(cores)}")
    for k, core in enumerate(cores):
        if core.dim() != 4:
            raise ValueError(f"{owner}: core {k} must be 4-D (R_prev, m, n, R_next), got shape {tuple(core.shape)}")
    if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise ValueError(f"{owner}: the first core's R_0 and the last core's R_d must be 1")
    for k in range(1, len(cores)):
        if cores[k].shape[0] != cores[k - 1].shape[3]:
            raise ValueError(
                f"{owner}: core {k - 1} ends with rank {cores[k - 1].shape[3]} but core {k} starts with rank "
                f"{cores[k].shape[0]}"
            )


def tt_gather_rows(ids: torch.Tensor, cores: Sequence[torch.Tensor], cols: int) -> torch.Tensor:
    """Rows ``W[ids]`` of a TT-matrix, ``(*ids.shape, cols)``, without forming ``W`` (Yin et al., eq. 3, Algorithm 1).

    The ids are deduplicated (``torch.unique``) so each distinct row is built once; for each the
    row is the chain ``T_1 = G_1[:, i_1]`` (``n_1 x R_1``), ``T_k = reshape(T_{k-1}, (N_{k-1}, R_{k-1}))
    G_k[:, i_k]`` (``N_{k-1} x n_k R_k``), one batched matmul per core. Cost per distinct id
    ``sum_k N_{k-1} R_{k-1} n_k R_k``; the gradient scatters into the core slices each id used.
    """
    _check_cores(cores, "tt_gather_rows")
    unique_ids, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    return _distinct_rows(unique_ids, cores, cols)[inverse].reshape(*ids.shape, cols)


def _distinct_rows(unique_ids: torch.Tensor, cores: Sequence[torch.Tensor], cols: int) -> torch.Tensor:
    """``(len(unique_ids), cols)``: the chain of batched products, once per (already distinct) id."""
    radices = tuple(core.shape[1] for core in cores)
    digits = mixed_radix_digits(unique_ids, radices)
    count = unique_ids.numel()
    # (count, n_1, R_1): the row slices of the first core (R_0 = 1); then N_k = n_1 ... n_k columns so far.
    columns = cores[0].shape[2]
    state = cores[0].permute(1, 0, 2, 3)[digits[0]].reshape(count, columns, cores[0].shape[3])
    for core, digit in zip(cores[1:], digits[1:]):
        rank_in, _, width, rank_out = core.shape
        slices = core.permute(1, 0, 2, 3)[digit].reshape(count, rank_in, width * rank_out)
        columns *= width
        state = torch.bmm(state, slices).reshape(count, columns, rank_out)
    return state.reshape(count, columns)[:, :cols]


def tt_embedding_bag(
    ids: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    cores: Sequence[torch.Tensor],
    cols: int,
    mode: str,
) -> torch.Tensor:
    """Bags of TT rows pooled as ``nn.EmbeddingBag`` (``mode`` sum/mean, ``include_last_offset=False``): TT-Rec's
    TT-EmbeddingBag (Yin et al., section 4.1). The distinct ids are built once (the chain of ``tt_gather_rows``),
    then pooled.
    """
    _check_cores(cores, "tt_embedding_bag")
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    rows = _distinct_rows(unique_ids, cores, cols)
    offsets = offsets.to(inverse.dtype) if offsets is not None else None
    return F.embedding_bag(inverse, rows, offsets, mode=mode, per_sample_weights=per_sample_weights)


def tt_materialize(cores: Sequence[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """The dense table ``W`` (Yin et al., eq. 2), cropped to ``(rows, cols)``.

    Contracts the cores left to right keeping the row and column digits apart:
    ``S_k[(i_1..i_k), (j_1..j_k), r_k] = sum_r S_{k-1}[..., r] G_k[r, i_k, j_k, r_k]``.
    """
    _check_cores(cores, "tt_materialize")
    state = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])  # (M, N, R)
    for core in cores[1:]:
        height, width = state.shape[0], state.shape[1]
        _, m, n, rank_out = core.shape
        state = torch.einsum("abr,rmns->ambns", state, core).reshape(height * m, width * n, rank_out)
    return state[:rows, :cols, 0]
