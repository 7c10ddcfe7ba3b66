"""Pure-PyTorch reference ops for sums of Kronecker products.

These are the op boundaries the fused kernels replace: each takes the factors
``F_j`` stacked over the rank as tensors of shape ``(r, a_j, b_j)`` and represents
``W = sum_k F_1k ⊗ F_2k ⊗ ... ⊗ F_nk`` (most significant digit first, as ``torch.kron``),
cropped to the true ``(rows, cols)`` (ARCHITECTURE.md, "The math").
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def mixed_radix_digits(ids: torch.Tensor, radices: tuple[int, ...]) -> list[torch.Tensor]:
    """Split integer ids into digits, most significant first (the ``torch.kron`` convention).

    ``id = sum_j d_j * prod_{l>j} radices[l]`` (REFERENCES.md section 0).
    """
    digits = []
    remainder = ids
    for radix in reversed(radices):
        digits.append(torch.remainder(remainder, radix))
        remainder = torch.div(remainder, radix, rounding_mode="floor")
    return digits[::-1]


def _kron_with_rank(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(r, prod a, prod b)``: the Kronecker product of each rank term, not yet summed."""
    product = factors[0]
    for factor in factors[1:]:
        r, a, b = product.shape
        _, c, d = factor.shape
        product = (product[:, :, None, :, None] * factor[:, None, :, None, :]).reshape(r, a * c, b * d)
    return product


def kron_materialize(factors: Sequence[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Dense ``W = sum_k ⊗_j F_jk`` cropped to ``(rows, cols)``.

    The last factor's Kronecker product and the sum over the rank are one matrix product,
    ``R(W) = L^T F_n`` with ``L`` the other factors' products flattened per rank term (the inverse
    of the Van Loan-Pitsianis rearrangement), so no ``(r, rows, cols)`` intermediate is formed.
    """
    rank = factors[0].shape[0]
    head = _kron_with_rank(factors[:-1])  # (r, A, B)
    _, head_rows, head_cols = head.shape
    _, last_rows, last_cols = factors[-1].shape
    rearranged = head.reshape(rank, -1).T @ factors[-1].reshape(rank, -1)  # (A*B, a*b)
    dense = rearranged.reshape(head_rows, head_cols, last_rows, last_cols).permute(0, 2, 1, 3)
    return dense.reshape(head_rows * last_rows, head_cols * last_cols)[:rows, :cols]


def _kron_matmul_order2(flat: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Order-2 ``x @ W.T`` as two plain GEMMs: ``Y = sum_k F_1k X F_2k^T`` for ``x`` viewed as ``(b_1, b_2)``.

    Stacking the rank into the GEMMs' inner and outer dimensions keeps each step one large
    matrix product instead of ``r`` small batched ones.
    """
    batch = flat.shape[0]
    rank, first_rows, first_cols = first.shape
    _, second_rows, second_cols = second.shape
    step = flat.reshape(batch * first_cols, second_cols) @ second.permute(2, 0, 1).reshape(second_cols, -1)
    step = step.reshape(batch, first_cols, rank, second_rows).permute(0, 3, 2, 1)
    step = step.reshape(batch * second_rows, rank * first_cols)
    result = step @ first.permute(0, 2, 1).reshape(rank * first_cols, first_rows)
    return result.reshape(batch, second_rows, first_rows).transpose(1, 2).reshape(batch, first_rows * second_rows)


def kron_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], out_features: int) -> torch.Tensor:
    """``x @ W.T`` without forming ``W``: contract one factor per mode (Van Loan 2000).

    For order 2 this is ``vec(sum_k F_1k X F_2k^T)`` with ``x`` reshaped to ``(b_1, b_2)``
    (Zhu et al., section 3). Input ``x`` has shape ``(..., cols)``; the result ``(..., out_features)``.
    """
    order = len(factors)
    in_sizes = [f.shape[2] for f in factors]
    out_sizes = [f.shape[1] for f in factors]
    lead_shape = x.shape[:-1]
    in_features = x.shape[-1]
    flat = x.reshape(-1, in_features)
    padding = math.prod(in_sizes) - in_features
    if padding:
        flat = F.pad(flat, (0, padding))
    if order == 2:
        state = _kron_matmul_order2(flat, factors[0], factors[1])
    else:
        state = flat.reshape(flat.shape[0], *in_sizes)
        # Letters: 'n' batch, 'r' rank, modes use distinct letters for the in and out sides.
        in_letters = string.ascii_uppercase[:order]
        out_letters = string.ascii_lowercase[:order]
        current = list(in_letters)
        has_rank = False
        for mode in reversed(range(order)):
            before = "n" + ("r" if has_rank else "") + "".join(current)
            current[mode] = out_letters[mode]
            after = "n" + ("" if mode == 0 else "r") + "".join(current)
            state = torch.einsum(f"{before},r{out_letters[mode]}{in_letters[mode]}->{after}", state, factors[mode])
            has_rank = True
    return state.reshape(flat.shape[0], math.prod(out_sizes))[:, :out_features].reshape(*lead_shape, out_features)


def kron_vectors_tree(
    vectors: Sequence[torch.Tensor],
    normalizers: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Kronecker product of vectors ``v_1 ⊗ ... ⊗ v_n`` along the last axis, as a balanced tree.

    ``((v_1 ⊗ v_2) ⊗ (v_3 ⊗ v_4))`` rather than a left fold (Panahi, section 3.3.3), so the
    sequential depth is ``O(log n)``. ``normalizers`` (word2ket's optional LayerNorms), one per
    internal node in the order the nodes are formed (level by level, left to right), are applied to
    those nodes; leading axes broadcast.
    """
    remaining_normalizers = iter(normalizers) if normalizers is not None else None
    level_nodes = list(vectors)
    while len(level_nodes) > 1:
        merged = []
        for left, right in zip(level_nodes[0::2], level_nodes[1::2]):
            node = (left[..., :, None] * right[..., None, :]).flatten(-2)
            merged.append(next(remaining_normalizers)(node) if remaining_normalizers is not None else node)
        if len(level_nodes) % 2:
            merged.append(level_nodes[-1])
        level_nodes = merged
    return level_nodes[0]


def kron_gather_rows(ids: torch.Tensor, factors: Sequence[torch.Tensor], cols: int) -> torch.Tensor:
    """Rows ``W[ids]`` built from one row of each factor: ``sum_k ⊗_j F_jk[i_j, :]``.

    ``ids`` of any shape are split into mixed-radix digits ``(i_1..i_n)`` over the factor row
    counts, most significant first (Panahi, eq. 3.4 and the lazy-row formula after it).
    Cost ``O(r * prod(b))`` per id; the table is never formed.
    """
    radices = tuple(f.shape[1] for f in factors)
    digits = mixed_radix_digits(ids.reshape(-1), radices)
    rows = [factor[:, digit, :].transpose(0, 1) for factor, digit in zip(factors, digits)]  # (ids, r, b_j)
    # The last product and the sum over the rank are one batched matmul: (ids, B, r) @ (ids, r, b_n).
    head = kron_vectors_tree(rows[:-1])
    gathered = (head.transpose(1, 2) @ rows[-1]).reshape(len(digits[0]), head.shape[-1] * rows[-1].shape[-1])
    return gathered[:, :cols].reshape(*ids.shape, cols)


def kpd_matmul(
    x: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_features: int
) -> torch.Tensor:
    """``x (sum_i (S ⊙ A_i) ⊗ B_i)^T`` (Zhu et al., eq. 3): ``kron_matmul`` on the factors ``[S ⊙ A, B]``."""
    return kron_matmul(x, [scale * a, b], out_features)
