"""Fused Triton tensor-train row gather and embedding bag (TT-Rec, Yin et al.).

Cores ``G_k`` of shape ``(R_{k-1}, m_k, n_k, R_k)``, ``R_0 = R_d = 1``; a row id splits into the
mixed-radix digits ``(i_1..i_d)`` over ``(m_1..m_d)``, most significant first, and the row is

    ``W[id, (j_1..j_d)] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]``

flattened with ``j_1`` most significant and cropped to ``cols`` (Yin et al., section 2 eq. 1-2 and
section 3.1 eq. 3). The bag pools rows as ``nn.EmbeddingBag``: ``bag_b = reduce_{t in bag b} w_t W[id_t]``
with ``reduce`` a sum or a mean (Yin et al., section 4.1 eq. 6-7, TT-EmbeddingBag, Algorithm 1).

Forward. The row index splits as ``p = h * n_d + c`` with ``h`` the head digits ``(j_1..j_{d-1})``.
One program builds a ``(BLOCK_H, n_d)`` tile of a row in registers: the chain of small per-index
products ``s(h) = G_1[0, i_1, j_1(h), :] G_2[:, i_2, j_2(h), :] ...`` (a ``(BLOCK_H, R)`` state, one
row-vector-times-matrix per head core), then ``tile = s G_d[:, i_d, :, 0]`` as one matrix product.
Up to rank 16 a chain step is one ``(BLOCK_H, R, R)`` broadcast product; from rank 17 (rank blocks 32
and 64, whose ``(BLOCK_H, R, R)`` tiles spill from four cores on) it is ``n_k`` matrix products
``sum_j [j_k(h) = j] s(h) G_k[:, i_k, j, :]`` of ``(BLOCK_H, R) x (R, R)`` tiles, ``n_k`` times the
multiply-adds in exchange for registers that stay within budget (in fp32 FMA, or at rank block 64
``tf32x3`` tensor-core products: three TF32 products, about fp32 accuracy).
The bag kernel loops over its ids and pools the weighted tiles in fp32 before the single store,
so neither the rows nor the ``T_k`` intermediates of FBTT's batched GEMMs touch global memory.

Backward, without atomics on hot rows (REFERENCES.md section 5 and "Kernels"; FBTT instead
``atomicAdd``s into dense cores): the pooled gradient is scattered to the id occurrences as
``w_t g_b`` (``/ |bag|`` for the mean) while the ids are deduplicated by sorting and summed per
unique id (one segmented sum); one program per unique id runs the chain backwards,
``dG_k[a, i_k, j, b] = sum_{h: j_k(h) = j} s_{k-1}(h)[a] g_k(h)[b]`` with ``g_k`` the gradient of
the state after core ``k`` (Yin et al., eq. 4-5 and Algorithm 2); a second segmented sum adds these
per-id slices per core row.

Memory: the forward writes only its output. The backward's fp32 workspaces are ``(N, cols)``
(gradient per unique id) and ``(N, head_blocks, sum_k R_{k-1} n_k R_k)`` (per-id core slices), sized by
the number ``N`` of ids because the number of unique ids stays on the device (no host sync).
fp32/fp16/bf16 inputs, fp32 accumulation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .coverage import tt_bag_problem, tt_rows_problem
from .torch_ops import mixed_radix_digits
from .triton_segment import reduce_by_digit, segment_sum, unique_slots


# Rank block from which a chain step is n_k (BLOCK_H, R) x (R, R) products instead of one (BLOCK_H, R, R) tile.
_DOT_CHAIN_RANK = tl.constexpr(32)
_MAX_REGISTERS = 255  # per thread (ptxas otherwise caps some of these kernels at 128 and spills)
_PERSISTENT_PROGRAMS = 1024
# Register budget of one program: elements of its largest tile.
_MAX_TILE_ELEMENTS = 4096


@triton.jit
def _core_slices(row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, K: tl.constexpr):
    """``(BLOCK_H, BLOCK_R, BLOCK_R)`` tile of ``G_K[a, i_K, j_K(h), b]`` (zero outside the core)."""
    offset = tl.load(meta_ptr + K * 8 + 0)
    rank_in = tl.load(meta_ptr + K * 8 + 1)
    rows = tl.load(meta_ptr + K * 8 + 2)
    width = tl.load(meta_ptr + K * 8 + 3)
    rank_out = tl.load(meta_ptr + K * 8 + 4)
    digit = (row_id // tl.load(meta_ptr + K * 8 + 5)) % rows
    col = (heads // tl.load(meta_ptr + K * 8 + 6)) % width
    pointers = cores_ptr + offset + ((ranks[None, :, None] * rows + digit) * width + col[:, None, None]) * rank_out
    pointers += ranks[None, None, :]
    mask = head_mask[:, None, None] & (ranks < rank_in)[None, :, None] & (ranks < rank_out)[None, None, :]
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _core_matrix(row_id, j, ranks, cores_ptr, meta_ptr, K: tl.constexpr, TRANSPOSED: tl.constexpr):
    """``(BLOCK_R, BLOCK_R)`` tile of ``G_K[a, i_K, j, b]`` (indexed ``[a, b]``, or ``[b, a]`` when transposed)."""
    offset = tl.load(meta_ptr + K * 8 + 0)
    rank_in = tl.load(meta_ptr + K * 8 + 1).to(tl.int32)  # int32 offsets within a core: half the registers
    rows = tl.load(meta_ptr + K * 8 + 2)
    width = tl.load(meta_ptr + K * 8 + 3).to(tl.int32)
    rank_out = tl.load(meta_ptr + K * 8 + 4).to(tl.int32)
    digit = ((row_id // tl.load(meta_ptr + K * 8 + 5)) % rows).to(tl.int32)
    rows = rows.to(tl.int32)
    if TRANSPOSED:
        r_in, r_out = ranks[None, :], ranks[:, None]
    else:
        r_in, r_out = ranks[:, None], ranks[None, :]
    pointers = cores_ptr + offset + ((r_in * rows + digit) * width + j) * rank_out + r_out
    return tl.load(pointers, mask=(r_in < rank_in) & (r_out < rank_out), other=0.0).to(tl.float32)


@triton.jit
def _chain_step(
    state, row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, K: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``s(h) G_K[:, i_K, j_K(h), :]`` of a ``(BLOCK_H, BLOCK_R)`` state, or ``g(h) G_K[:, i_K, j_K(h), :]^T`` when
    ``BACKWARD`` (the gradient of the state before core ``K`` from the one after it)."""
    if BLOCK_R >= _DOT_CHAIN_RANK:
        width = tl.load(meta_ptr + K * 8 + 3)
        col = (heads // tl.load(meta_ptr + K * 8 + 6)) % width
        result = tl.zeros_like(state)
        for j in range(width):
            selected = tl.where((col == j)[:, None], state, 0.0)
            matrix = _core_matrix(row_id, j, ranks, cores_ptr, meta_ptr, K, BACKWARD)
            result += tl.dot(selected, matrix, input_precision=PRECISION)
    else:
        slices = _core_slices(row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, K)
        if BACKWARD:
            result = tl.sum(slices * state[:, None, :], axis=2)
        else:
            result = tl.sum(state[:, :, None] * slices, axis=1)
    return result


@triton.jit
def _head_state(
    row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, UPTO: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``(BLOCK_H, BLOCK_R)`` state ``s(h) = G_1[0, i_1, j_1(h), :] ... G_UPTO[:, i_UPTO, j_UPTO(h), :]``."""
    offset = tl.load(meta_ptr + 0)
    rows = tl.load(meta_ptr + 2)
    width = tl.load(meta_ptr + 3)
    rank_out = tl.load(meta_ptr + 4)
    digit = (row_id // tl.load(meta_ptr + 5)) % rows
    col = (heads // tl.load(meta_ptr + 6)) % width
    pointers = cores_ptr + offset + (digit * width + col[:, None]) * rank_out + ranks[None, :]
    state = tl.load(pointers, mask=head_mask[:, None] & (ranks < rank_out)[None, :], other=0.0).to(tl.float32)
    for k in tl.static_range(1, UPTO):
        state = _chain_step(state, row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, k, False, BLOCK_R, PRECISION)
    return state


@triton.jit
def _last_core(row_id, ranks, last_cols, cores_ptr, meta_ptr, ORDER: tl.constexpr):
    """``(BLOCK_R, BLOCK_B)`` tile of ``G_d[a, i_d, c, 0]``."""
    offset = tl.load(meta_ptr + (ORDER - 1) * 8 + 0)
    rank_in = tl.load(meta_ptr + (ORDER - 1) * 8 + 1)
    rows = tl.load(meta_ptr + (ORDER - 1) * 8 + 2)
    width = tl.load(meta_ptr + (ORDER - 1) * 8 + 3)
    pointers = cores_ptr + offset + (ranks[:, None] * rows + row_id % rows) * width + last_cols[None, :]
    mask = (ranks < rank_in)[:, None] & (last_cols < width)[None, :]
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tt_forward_kernel(
    ids_ptr,
    bounds_ptr,
    weights_ptr,
    cores_ptr,
    meta_ptr,
    out_ptr,
    cols,
    head_size,
    last_width,
    ORDER: tl.constexpr,
    POOLED: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Output row (a gathered row, or a bag pooled over ``[bounds[row], bounds[row + 1])``), one head block."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < head_size
    ranks = tl.arange(0, BLOCK_R)
    last_cols = tl.arange(0, BLOCK_B)
    if POOLED:
        start = tl.load(bounds_ptr + row)
        end = tl.load(bounds_ptr + row + 1)
    else:
        start = row
        end = row + 1
    acc = tl.zeros([BLOCK_H, BLOCK_B], dtype=tl.float32)
    for position in range(start, end):
        row_id = tl.load(ids_ptr + position).to(tl.int64)
        state = _head_state(row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, ORDER - 1, BLOCK_R, PRECISION)
        tile = tl.dot(
            state, _last_core(row_id, ranks, last_cols, cores_ptr, meta_ptr, ORDER), input_precision=PRECISION
        )
        if HAS_WEIGHTS:
            tile *= tl.load(weights_ptr + position).to(tl.float32)
        acc += tile
    if MEAN:
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)
    out_cols = heads[:, None] * last_width + last_cols[None, :]
    mask = head_mask[:, None] & (last_cols < last_width)[None, :] & (out_cols < cols)
    tl.store(out_ptr + row * cols + out_cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tt_backward_kernel(
    grad_ptr,
    slot_ids_ptr,
    num_unique_ptr,
    cores_ptr,
    meta_ptr,
    contrib_ptr,
    contrib_width,
    head_blocks,
    cols,
    head_size,
    last_width,
    ORDER: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per unique id and head block: ``contrib[slot, block]`` = gradient w.r.t. each core's slice ``G_k[:, i_k]``."""
    total_work = tl.load(num_unique_ptr) * head_blocks
    ranks = tl.arange(0, BLOCK_R)
    last_cols = tl.arange(0, BLOCK_B)
    head_cols = tl.arange(0, BLOCK_N)
    for work in range(tl.program_id(0), total_work, tl.num_programs(0)):
        slot = work // head_blocks
        heads = (work % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        head_mask = heads < head_size
        row_id = tl.load(slot_ids_ptr + slot).to(tl.int64)
        out_cols = heads[:, None] * last_width + last_cols[None, :]
        grad_mask = head_mask[:, None] & (last_cols < last_width)[None, :] & (out_cols < cols)
        grad = tl.load(grad_ptr + slot * cols + out_cols, mask=grad_mask, other=0.0)
        base = contrib_ptr + work * contrib_width
        last = _last_core(row_id, ranks, last_cols, cores_ptr, meta_ptr, ORDER)
        state = _head_state(row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, ORDER - 1, BLOCK_R, PRECISION)
        last_grad = tl.dot(tl.trans(state), grad, input_precision=PRECISION)
        last_rank = tl.load(meta_ptr + (ORDER - 1) * 8 + 1)
        last_pointers = (
            base + tl.load(meta_ptr + (ORDER - 1) * 8 + 7) + ranks[:, None] * last_width + last_cols[None, :]
        )
        tl.store(last_pointers, last_grad, mask=(ranks < last_rank)[:, None] & (last_cols < last_width)[None, :])
        state_grad = tl.dot(grad, tl.trans(last), input_precision=PRECISION)
        for k in tl.static_range(ORDER - 1):
            core_grad = state_grad
            for later in tl.static_range(ORDER - 2, k, -1):
                core_grad = _chain_step(
                    core_grad, row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, later, True, BLOCK_R, PRECISION
                )
            rank_in = tl.load(meta_ptr + k * 8 + 1)
            width = tl.load(meta_ptr + k * 8 + 3)
            rank_out = tl.load(meta_ptr + k * 8 + 4)
            col = (heads // tl.load(meta_ptr + k * 8 + 6)) % width
            core_base = base + tl.load(meta_ptr + k * 8 + 7)
            if k == 0:
                one_hot = tl.where(head_mask[:, None] & (col[:, None] == head_cols[None, :]), 1.0, 0.0)
                first_grad = tl.dot(tl.trans(one_hot), core_grad, input_precision=PRECISION)
                first_pointers = core_base + head_cols[:, None] * rank_out + ranks[None, :]
                tl.store(first_pointers, first_grad, mask=(head_cols < width)[:, None] & (ranks < rank_out)[None, :])
            else:
                previous = _head_state(row_id, heads, head_mask, ranks, cores_ptr, meta_ptr, k, BLOCK_R, PRECISION)
                store_mask = (ranks < rank_in)[:, None] & (ranks < rank_out)[None, :]
                width_32, rank_out_32 = width.to(tl.int32), rank_out.to(tl.int32)
                for j in range(width_32):
                    selected = tl.where(head_mask[:, None] & (col == j)[:, None], previous, 0.0)
                    slice_grad = tl.dot(tl.trans(selected), core_grad, input_precision=PRECISION)
                    slice_pointers = core_base + (ranks[:, None] * width_32 + j) * rank_out_32 + ranks[None, :]
                    tl.store(slice_pointers, slice_grad, mask=store_mask)


def _blocks(cores: Sequence[torch.Tensor]) -> tuple[int, int, int, int, int]:
    """``head_size, BLOCK_H, BLOCK_R, BLOCK_B, BLOCK_N``; every tile side >= 16 for ``tl.dot``."""
    head_size = math.prod(core.shape[2] for core in cores[:-1])
    block_r = max(16, triton.next_power_of_2(max(core.shape[3] for core in cores[:-1])))
    block_b = max(16, triton.next_power_of_2(cores[-1].shape[2]))
    if block_r >= _DOT_CHAIN_RANK.value:
        block_h = 16  # the (R, R) core slices, not the heads, fill the registers
    else:
        block_h = max(16, min(triton.next_power_of_2(head_size), _MAX_TILE_ELEMENTS // max(block_r**2, block_b)))
    block_n = max(16, triton.next_power_of_2(cores[0].shape[2]))
    return head_size, block_h, block_r, block_b, block_n


def _launch_options(block_r: int) -> dict[str, int]:
    """Launch options: four warps for the broadcast chain (rank block 16); eight warps, one pipelining stage and
    up to 255 registers for the matrix-product chain (rank blocks 32 and 64).

    On sm_90 ptxas spills the broadcast chain's ``(BLOCK_H, 32, 32)`` tiles from four cores on, and the
    matrix-product chain with more pipelining stages or its default register cap.
    """
    if block_r >= _DOT_CHAIN_RANK.value:
        return {"num_warps": 8, "num_stages": 1, "maxnreg": _MAX_REGISTERS}
    return {"num_warps": 4}


def _precision(block_r: int) -> str:
    """Products in fp32 FMA (``ieee``) up to rank block 32; at 64 on tensor cores as ``tf32x3`` (three TF32 products,
    about fp32 accuracy), whose register tiles fit where the ``ieee`` ones with a 64-long reduction spill (backward,
    four or more cores)."""
    return "tf32x3" if block_r >= 64 else "ieee"


def _metadata(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per core: packed offset, R_prev, m, n, R_next, id stride, head column stride, gradient offset."""
    return _metadata_table(tuple(tuple(core.shape) for core in cores), cores[0].device)


@functools.lru_cache(maxsize=64)
def _metadata_table(shapes: tuple[tuple[int, int, int, int], ...], device: torch.device) -> torch.Tensor:
    """Built once per core shapes and device: no host-to-device copy per call."""
    rows, widths = [shape[1] for shape in shapes], [shape[2] for shape in shapes]
    table, offset, contrib_offset = [], 0, 0
    for k, (rank_in, _, width, rank_out) in enumerate(shapes):
        id_stride, col_stride = math.prod(rows[k + 1 :]), math.prod(widths[k + 1 : -1])
        table.append([offset, rank_in, rows[k], width, rank_out, id_stride, col_stride, contrib_offset])
        offset += rank_in * rows[k] * width * rank_out
        contrib_offset += rank_in * width * rank_out
    return torch.tensor(table, dtype=torch.int64, device=device)


def tt_forward(
    ids: torch.Tensor,
    bounds: torch.Tensor | None,
    weights: torch.Tensor | None,
    cores: Sequence[torch.Tensor],
    cols: int,
    mean: bool,
) -> torch.Tensor:
    """Rows ``W[ids]`` (``bounds is None``) or bags pooled over ``[bounds[b], bounds[b + 1])``, ``(rows, cols)``."""
    out_rows = len(ids) if bounds is None else len(bounds) - 1
    out = torch.empty(out_rows, cols, dtype=cores[0].dtype, device=ids.device)
    if out_rows == 0:
        return out
    head_size, block_h, block_r, block_b, _ = _blocks(cores)
    _tt_forward_kernel[(out_rows, triton.cdiv(head_size, block_h))](
        ids,
        bounds if bounds is not None else ids,
        weights if weights is not None else out,
        torch.cat([core.reshape(-1) for core in cores]),
        _metadata(cores),
        out,
        cols,
        head_size,
        cores[-1].shape[2],
        ORDER=len(cores),
        POOLED=bounds is not None,
        HAS_WEIGHTS=weights is not None,
        MEAN=mean,
        BLOCK_H=block_h,
        BLOCK_R=block_r,
        BLOCK_B=block_b,
        PRECISION=_precision(block_r),
        **_launch_options(block_r),
    )
    return out


def tt_backward(
    ids: torch.Tensor,
    grad: torch.Tensor,
    cores: Sequence[torch.Tensor],
    grad_rows: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Core gradients: occurrence ``t`` of ``ids`` receives ``scale[t] * grad[grad_rows[t]]`` (defaults: 1, ``t``)."""
    if len(ids) == 0:
        return [torch.zeros_like(core) for core in cores]
    cols = grad.shape[1]
    slots = unique_slots(ids)
    source_rows = slots.order if grad_rows is None else grad_rows[slots.order]
    sorted_scale = scale[slots.order] if scale is not None else None
    slot_grads = segment_sum(grad, source_rows, slots.starts, slots.ends, scale=sorted_scale)
    head_size, block_h, block_r, block_b, block_n = _blocks(cores)
    head_blocks = triton.cdiv(head_size, block_h)
    widths = [core.shape[0] * core.shape[2] * core.shape[3] for core in cores]
    contrib = torch.empty(len(ids), head_blocks, sum(widths), dtype=torch.float32, device=ids.device)
    _tt_backward_kernel[(min(len(ids) * head_blocks, _PERSISTENT_PROGRAMS),)](
        slot_grads,
        slots.slot_ids,
        slots.num_unique,
        torch.cat([core.reshape(-1) for core in cores]),
        _metadata(cores),
        contrib,
        sum(widths),
        head_blocks,
        cols,
        head_size,
        cores[-1].shape[2],
        ORDER=len(cores),
        BLOCK_H=block_h,
        BLOCK_R=block_r,
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        PRECISION=_precision(block_r),
        **_launch_options(block_r),
    )
    contrib = contrib[:, 0] if head_blocks == 1 else contrib.sum(1)
    digits = mixed_radix_digits(slots.slot_ids, tuple(core.shape[1] for core in cores))
    grads, offset = [], 0
    for core, digit, width in zip(cores, digits, widths):
        rank_in, rows, core_cols, rank_out = core.shape
        summed = reduce_by_digit(contrib[:, offset : offset + width], digit, slots.valid, rows)
        grads.append(summed.reshape(rows, rank_in, core_cols, rank_out).transpose(0, 1).to(core.dtype))
        offset += width
    return grads


def tt_bag_backward(
    ids: torch.Tensor, bounds: torch.Tensor, weights: torch.Tensor | None, grad: torch.Tensor,
    cores: Sequence[torch.Tensor], mean: bool,
) -> list[torch.Tensor]:  # fmt: skip
    """Core gradients of the bags pooled over ``[bounds[b], bounds[b + 1])`` given their gradient ``grad``."""
    if len(bounds) == 1:  # no bags: the output does not depend on the cores
        return [torch.zeros_like(core) for core in cores]
    positions = torch.arange(len(ids), device=ids.device, dtype=bounds.dtype)
    bag_of = torch.searchsorted(bounds, positions, right=True) - 1
    scale = weights
    if mean:
        counts = (bounds[1:] - bounds[:-1]).clamp(min=1)
        scale = 1.0 / counts.to(torch.float32)[bag_of]
    return tt_backward(ids, grad.contiguous(), cores, grad_rows=bag_of, scale=scale)


def tt_gather_rows_triton(ids: torch.Tensor, cores: Sequence[torch.Tensor], cols: int) -> torch.Tensor:
    """Triton ``tt_gather_rows``: TT rows ``W[ids]``, shape ``(*ids.shape, cols)``, differentiable with respect to
    the cores (the ``kron_transformers::tt_gather_rows`` custom op).

    Ids must lie in ``[0, prod m_k)`` (not checked on the device, to avoid a host sync).
    """
    from .library_ops import tt_gather_rows

    problem = tt_rows_problem(ids, cores, cols)
    if problem is not None:
        raise ValueError(f"tt_gather_rows_triton: {problem}.")
    return tt_gather_rows(ids, cores, cols)


def tt_embedding_bag_triton(
    ids: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    cores: Sequence[torch.Tensor],
    cols: int,
    mode: str,
) -> torch.Tensor:
    """Bags of TT rows pooled as ``nn.EmbeddingBag`` (``include_last_offset=False``), shape ``(bags, cols)``.

    Bag ``b`` holds ``ids[offsets[b]:offsets[b + 1]]`` (the last one runs to the end; ``offsets[0]``
    must be 0 and offsets non-decreasing, not checked on the device); 2-d ``ids`` without offsets
    are one bag per row. ``mode="sum"`` takes optional ``per_sample_weights``; an empty bag is zeros.
    Differentiable with respect to the cores and the weights (the ``kron_transformers::tt_embedding_bag`` op).
    """
    from .library_ops import tt_embedding_bag

    problem = tt_bag_problem(ids, offsets, per_sample_weights, cores, cols, mode)
    if problem is not None:
        raise ValueError(f"tt_embedding_bag_triton: {problem}.")
    return tt_embedding_bag(ids, offsets, per_sample_weights, cores, cols, mode)
