"""Fused Triton row gather for sums of Kronecker products (word2ketXS / Shapeshifter embeddings).

Same contract as :func:`kron_transformers.kernels.torch_ops.kron_gather_rows`: factors ``F_j`` of
shape ``(r, a_j, b_j)``, row ``W[id] = sum_k F_1k[i_1, :] ⊗ ... ⊗ F_nk[i_n, :]`` with the digits
``(i_1..i_n)`` of ``id`` in the mixed radix ``(a_1..a_n)``, most significant first, cropped to
``cols`` (Panahi, eq. 3.4 and the lazy-row formula after it).

Forward. The row index ``p < prod b`` splits as ``p = h * b_n + c``: ``h`` runs over the
"head" digits ``(c_1..c_{n-1})`` and ``c`` over the last factor's columns. Each program builds
a ``(BLOCK_H, b_n)`` tile of one token's row in registers as one small matrix product over the
rank, ``row[h, c] = sum_k head_k(h) F_nk[i_n, c]`` with ``head_k(h) = prod_{j<n} F_jk[i_j, c_j(h)]``
gathered from the (cache-resident) factor rows; only the output row is written to memory,
``O(r * prod b)`` work per token and no table.

Backward, without atomics on hot rows (REFERENCES.md section 1: tiny factors, every token
scatters into a few rows):

1. deduplicate the ids by sorting and sum the output gradient per unique id
   (:func:`~kron_transformers.kernels.triton_segment.unique_slots`, a segmented sum);
2. one program per unique id (and head block) forms the gradient with respect to each of its
   digit rows, ``dF_nk[i_n, c] = sum_h head_k(h) G[h, c]`` and
   ``dF_jk[i_j, c'] = sum_{h: c_j(h) = c'} (sum_c G[h, c] F_nk[i_n, c]) prod_{l != j, l < n} F_lk[i_l, c_l(h)]``
   (matrix products with a one-hot matrix of ``c_j(h)``);
3. these per-id rows are summed per factor row by a second segmented sum over the ids sorted
   by that factor's digit.

Memory: the forward writes only its output. The backward's fp32 workspaces are ``(N, cols)``
(gradient per unique id) and ``(N, head_blocks, r * sum_j b_j)`` (per-id factor-row gradients),
sized by the number ``N`` of ids because the number of unique ids stays on the device (no host sync).
Inputs may be fp32, fp16 or bf16; every product and sum accumulates in fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .coverage import kron_gather_rows_problem
from .torch_ops import mixed_radix_digits
from .triton_segment import reduce_by_digit, segment_sum, unique_slots


_PERSISTENT_PROGRAMS = 1024
# Register budget of one program: elements of its largest tile, and the widest rank block.
_MAX_TILE_ELEMENTS = 1024  # of a (BLOCK_H, BLOCK_B) or (BLOCK_H, BLOCK_R) tile
_MAX_RANK_BLOCK = 32
# Up to 255 registers per thread for the backward: ptxas otherwise caps some of its tiles at 128 and spills (sm_90);
# the forward spills with that cap lifted (fp32, rank block 32) and keeps ptxas's default.
_FORWARD_OPTIONS = {"num_warps": 4}
_BACKWARD_OPTIONS = {"num_warps": 4, "maxnreg": 255}


@triton.jit
def _head_product(
    row_id, heads, head_mask, ranks, rank_mask, factors_ptr, meta_ptr, ORDER: tl.constexpr, SKIP: tl.constexpr
):
    """``(BLOCK_H, BLOCK_R)`` tile of ``prod_{j < n, j != SKIP} F_jk[i_j, c_j(h)]`` (zero outside the masks)."""
    mask = head_mask[:, None] & rank_mask[None, :]
    product = tl.where(mask, 1.0, 0.0)
    for j in tl.static_range(ORDER - 1):
        if j != SKIP:
            offset = tl.load(meta_ptr + j * 6 + 0)
            rows = tl.load(meta_ptr + j * 6 + 1)
            width = tl.load(meta_ptr + j * 6 + 2)
            digit = (row_id // tl.load(meta_ptr + j * 6 + 3)) % rows
            col = (heads // tl.load(meta_ptr + j * 6 + 4)) % width
            pointers = factors_ptr + offset + (ranks[None, :] * rows + digit) * width + col[:, None]
            product *= tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    return product


@triton.jit
def _last_rows(row_id, ranks, rank_mask, last_cols, factors_ptr, meta_ptr, ORDER: tl.constexpr):
    """``(BLOCK_R, BLOCK_B)`` tile of the last factor's digit rows ``F_nk[i_n, :]``."""
    offset = tl.load(meta_ptr + (ORDER - 1) * 6 + 0)
    rows = tl.load(meta_ptr + (ORDER - 1) * 6 + 1)
    width = tl.load(meta_ptr + (ORDER - 1) * 6 + 2)
    digit = row_id % rows
    pointers = factors_ptr + offset + (ranks[:, None] * rows + digit) * width + last_cols[None, :]
    mask = rank_mask[:, None] & (last_cols < width)[None, :]
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _kron_gather_forward_kernel(
    ids_ptr,
    factors_ptr,
    meta_ptr,
    out_ptr,
    rank,
    cols,
    head_size,
    last_width,
    ORDER: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < head_size
    last_cols = tl.arange(0, BLOCK_B)
    row_id = tl.load(ids_ptr + token).to(tl.int64)
    acc = tl.zeros([BLOCK_H, BLOCK_B], dtype=tl.float32)
    for rank_start in range(0, rank, BLOCK_R):
        ranks = rank_start + tl.arange(0, BLOCK_R)
        rank_mask = ranks < rank
        head = _head_product(row_id, heads, head_mask, ranks, rank_mask, factors_ptr, meta_ptr, ORDER, -1)
        last = _last_rows(row_id, ranks, rank_mask, last_cols, factors_ptr, meta_ptr, ORDER)
        acc += tl.dot(head, last, input_precision="ieee")
    out_cols = heads[:, None] * last_width + last_cols[None, :]
    mask = head_mask[:, None] & (last_cols < last_width)[None, :] & (out_cols < cols)
    tl.store(out_ptr + token * cols + out_cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kron_gather_backward_kernel(
    grad_ptr,
    slot_ids_ptr,
    num_unique_ptr,
    factors_ptr,
    meta_ptr,
    contrib_ptr,
    contrib_width,
    head_blocks,
    rank,
    cols,
    head_size,
    last_width,
    ORDER: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_BJ: tl.constexpr,
):
    """Per unique id and head block: ``contrib[slot, block]`` = gradient w.r.t. each factor's digit rows."""
    total_work = tl.load(num_unique_ptr) * head_blocks
    last_cols = tl.arange(0, BLOCK_B)
    head_cols = tl.arange(0, BLOCK_BJ)
    for work in range(tl.program_id(0), total_work, tl.num_programs(0)):
        slot = work // head_blocks
        heads = (work % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        head_mask = heads < head_size
        row_id = tl.load(slot_ids_ptr + slot).to(tl.int64)
        out_cols = heads[:, None] * last_width + last_cols[None, :]
        grad_mask = head_mask[:, None] & (last_cols < last_width)[None, :] & (out_cols < cols)
        grad = tl.load(grad_ptr + slot * cols + out_cols, mask=grad_mask, other=0.0)
        base = contrib_ptr + work * contrib_width
        for rank_start in range(0, rank, BLOCK_R):
            ranks = rank_start + tl.arange(0, BLOCK_R)
            rank_mask = ranks < rank
            last = _last_rows(row_id, ranks, rank_mask, last_cols, factors_ptr, meta_ptr, ORDER)
            head = _head_product(row_id, heads, head_mask, ranks, rank_mask, factors_ptr, meta_ptr, ORDER, -1)
            last_grad = tl.dot(tl.trans(head), grad, input_precision="ieee")
            last_offset = tl.load(meta_ptr + (ORDER - 1) * 6 + 5)
            last_pointers = base + last_offset + ranks[:, None] * last_width + last_cols[None, :]
            tl.store(last_pointers, last_grad, mask=rank_mask[:, None] & (last_cols < last_width)[None, :])
            grad_through_last = tl.dot(grad, tl.trans(last), input_precision="ieee")
            for j in tl.static_range(ORDER - 1):
                others = _head_product(row_id, heads, head_mask, ranks, rank_mask, factors_ptr, meta_ptr, ORDER, j)
                width = tl.load(meta_ptr + j * 6 + 2)
                col = (heads // tl.load(meta_ptr + j * 6 + 4)) % width
                one_hot = tl.where(head_mask[:, None] & (col[:, None] == head_cols[None, :]), 1.0, 0.0)
                factor_grad = tl.dot(tl.trans(grad_through_last * others), one_hot, input_precision="ieee")
                factor_pointers = base + tl.load(meta_ptr + j * 6 + 5) + ranks[:, None] * width + head_cols[None, :]
                tl.store(factor_pointers, factor_grad, mask=rank_mask[:, None] & (head_cols < width)[None, :])


def _blocks(factors: Sequence[torch.Tensor]) -> tuple[int, int, int, int, int]:
    """``head_size, BLOCK_H, BLOCK_R, BLOCK_B, BLOCK_BJ``; every tile side >= 16 for ``tl.dot``."""
    rank = factors[0].shape[0]
    head_size = math.prod(f.shape[2] for f in factors[:-1])
    block_b = max(16, triton.next_power_of_2(factors[-1].shape[2]))
    block_r = max(16, min(triton.next_power_of_2(rank), _MAX_RANK_BLOCK))
    largest = max(block_b, block_r)
    block_h = max(16, min(triton.next_power_of_2(head_size), _MAX_TILE_ELEMENTS // largest))
    block_bj = max(16, triton.next_power_of_2(max((f.shape[2] for f in factors[:-1]), default=1)))
    return head_size, block_h, block_r, block_b, block_bj


def _metadata(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per factor: offset in the packed buffer, rows, cols, id stride, head column stride, gradient offset."""
    return _metadata_table(tuple(tuple(f.shape) for f in factors), factors[0].device)


@functools.lru_cache(maxsize=64)
def _metadata_table(shapes: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
    """Built once per factor shapes and device: no host-to-device copy per call."""
    rows, widths = [shape[1] for shape in shapes], [shape[2] for shape in shapes]
    table, offset, contrib_offset = [], 0, 0
    for j, (rank, _, width) in enumerate(shapes):
        table.append([offset, rows[j], width, math.prod(rows[j + 1 :]), math.prod(widths[j + 1 : -1]), contrib_offset])
        offset += rank * rows[j] * width
        contrib_offset += rank * width
    return torch.tensor(table, dtype=torch.int64, device=device)


def gather_forward(ids: torch.Tensor, factors: Sequence[torch.Tensor], cols: int) -> torch.Tensor:
    """Rows ``W[ids]`` for 1-d ``ids``, ``(len(ids), cols)``, by ``_kron_gather_forward_kernel``."""
    out = torch.empty(len(ids), cols, dtype=factors[0].dtype, device=ids.device)
    if len(ids):
        packed = torch.cat([f.reshape(-1) for f in factors])
        head_size, block_h, block_r, block_b, _ = _blocks(factors)
        grid = (len(ids), triton.cdiv(head_size, block_h))
        _kron_gather_forward_kernel[grid](
            ids,
            packed,
            _metadata(factors),
            out,
            factors[0].shape[0],
            cols,
            head_size,
            factors[-1].shape[2],
            ORDER=len(factors),
            BLOCK_H=block_h,
            BLOCK_R=block_r,
            BLOCK_B=block_b,
            **_FORWARD_OPTIONS,
        )
    return out


def gather_backward(ids: torch.Tensor, grad_rows: torch.Tensor, factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Factor gradients of ``rows[t] = W[ids[t]]`` given ``grad_rows`` ``(len(ids), cols)``, dedup'd, atomic-free."""
    if len(ids) == 0:
        return [torch.zeros_like(f) for f in factors]
    rank, cols = factors[0].shape[0], grad_rows.shape[1]
    slots = unique_slots(ids)
    slot_grads = segment_sum(grad_rows, slots.order, slots.starts, slots.ends)
    head_size, block_h, block_r, block_b, block_bj = _blocks(factors)
    head_blocks = triton.cdiv(head_size, block_h)
    contrib_width = sum(rank * f.shape[2] for f in factors)
    contrib = torch.empty(len(ids), head_blocks, contrib_width, dtype=torch.float32, device=ids.device)
    packed = torch.cat([f.reshape(-1) for f in factors])
    programs = min(len(ids) * head_blocks, _PERSISTENT_PROGRAMS)
    _kron_gather_backward_kernel[(programs,)](
        slot_grads,
        slots.slot_ids,
        slots.num_unique,
        packed,
        _metadata(factors),
        contrib,
        contrib_width,
        head_blocks,
        rank,
        cols,
        head_size,
        factors[-1].shape[2],
        ORDER=len(factors),
        BLOCK_H=block_h,
        BLOCK_R=block_r,
        BLOCK_B=block_b,
        BLOCK_BJ=block_bj,
        **_BACKWARD_OPTIONS,
    )
    contrib = contrib[:, 0] if head_blocks == 1 else contrib.sum(1)
    digits = mixed_radix_digits(slots.slot_ids, tuple(f.shape[1] for f in factors))
    grads, offset = [], 0
    for factor, digit in zip(factors, digits):
        _, rows, width = factor.shape
        summed = reduce_by_digit(contrib[:, offset : offset + rank * width], digit, slots.valid, rows)
        grads.append(summed.reshape(rows, rank, width).transpose(0, 1).to(factor.dtype))
        offset += rank * width
    return grads


def kron_gather_rows_triton(ids: torch.Tensor, factors: Sequence[torch.Tensor], cols: int) -> torch.Tensor:
    """Triton :func:`~kron_transformers.kernels.torch_ops.kron_gather_rows`: ``W[ids]``, shape ``(*ids.shape, cols)``,
    differentiable with respect to the factors (the ``kron_transformers::kron_gather_rows`` custom op).

    Ids must lie in ``[0, prod a_j)`` (not checked on the device, to avoid a host sync).
    """
    from .library_ops import kron_gather_rows

    problem = kron_gather_rows_problem(ids, factors, cols)
    if problem is not None:
        raise ValueError(f"kron_gather_rows_triton: {problem}.")
    return kron_gather_rows(ids, factors, cols)
