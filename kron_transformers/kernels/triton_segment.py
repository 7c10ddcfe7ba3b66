"""Deterministic, atomic-free segmented reductions shared by the embedding kernels' backward passes.

The backward pass of a lazily gathered embedding scatters many token gradients into few
rows (a hot id, or a factor row of ``a_j`` ~ 14..250 rows hit by every token). Atomics on
those rows serialize and are nondeterministic (FBTT's ``atomicAdd`` into dense cores,
REFERENCES.md section 5), so the kernels here instead sort the keys, cut the sorted order
into segments and let exactly one program sum each (piece of a) segment in fp32
(REFERENCES.md section 1 and "Kernels": deduplicate ids, segmented sums, no atomics).
Everything stays on the device: segment bounds come from ``cumsum`` / ``searchsorted``,
never from a host-synchronizing ``torch.unique``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_sum_kernel(
    src_ptr,
    src_row_stride,
    row_index_ptr,
    scale_ptr,
    starts_ptr,
    ends_ptr,
    out_ptr,
    n_cols,
    splits,
    HAS_SCALE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[s, split, c] = sum_{p in piece(split) of [start_s, end_s)} scale[p] * src[row_index[p], c]``."""
    segment = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    start = tl.load(starts_ptr + segment)
    end = tl.load(ends_ptr + segment)
    piece = tl.cdiv(end - start, splits)
    piece_start = start + split * piece
    piece_end = tl.minimum(piece_start + piece, end)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for first in range(piece_start, piece_end, BLOCK_P):
        positions = first + tl.arange(0, BLOCK_P)
        position_mask = positions < piece_end
        rows = tl.load(row_index_ptr + positions, mask=position_mask, other=0).to(tl.int64)
        mask = position_mask[:, None] & col_mask[None, :]
        values = tl.load(src_ptr + rows[:, None] * src_row_stride + cols[None, :], mask=mask, other=0.0)
        values = values.to(tl.float32)
        if HAS_SCALE:
            scales = tl.load(scale_ptr + positions, mask=position_mask, other=0.0).to(tl.float32)
            values = values * scales[:, None]
        acc += values
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + (segment * splits + split) * n_cols + cols, total, mask=col_mask)


def segment_sum(
    src: torch.Tensor,
    row_index: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    scale: torch.Tensor | None = None,
    splits: int = 1,
) -> torch.Tensor:
    """``out[s] = sum_{p in [starts[s], ends[s])} scale[p] * src[row_index[p]]`` in fp32, shape ``(segments, cols)``.

    ``src`` is a ``(rows, cols)`` matrix with unit column stride (any float dtype); ``row_index`` maps sorted
    positions to its rows. ``splits > 1`` cuts every segment into that many pieces summed by
    separate programs and added afterwards (in a fixed order), so that few long segments (a
    hot row) still fill the device.
    """
    num_segments, n_cols = len(starts), src.shape[1]
    out = torch.empty(num_segments, splits, n_cols, dtype=torch.float32, device=src.device)
    if num_segments == 0 or n_cols == 0:
        return out.sum(1)
    if src.stride(1) != 1:
        src = src.contiguous()
    block_c = min(triton.next_power_of_2(n_cols), 256)
    grid = (num_segments, splits, triton.cdiv(n_cols, block_c))
    _segment_sum_kernel[grid](
        src,
        src.stride(0),
        row_index,
        scale if scale is not None else src,
        starts,
        ends,
        out,
        n_cols,
        splits,
        HAS_SCALE=scale is not None,
        BLOCK_P=16,
        BLOCK_C=block_c,
    )
    return out[:, 0] if splits == 1 else out.sum(1)


@dataclass
class UniqueSlots:
    """Deduplicated ids laid out in ``len(ids)`` slots, the first ``num_unique`` of them used.

    ``order`` sorts the ids; slot ``s`` covers sorted positions ``[starts[s], ends[s])`` and holds
    ``slot_ids[s]``. Unused slots have an empty range and ``valid[s] = False``; ``num_unique`` is a
    one-element device tensor, so nothing waits for the host.
    """

    order: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    slot_ids: torch.Tensor
    valid: torch.Tensor
    num_unique: torch.Tensor


def unique_slots(ids: torch.Tensor) -> UniqueSlots:
    """Sort-based ``torch.unique(ids, return_inverse=True, return_counts=True)`` without a host sync."""
    count = len(ids)
    sorted_ids, order = torch.sort(ids, stable=True)  # stable: a fixed summation order, bitwise reproducible
    is_start = torch.ones_like(sorted_ids, dtype=torch.bool)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot = torch.cumsum(is_start, 0) - 1
    positions = torch.arange(count, device=ids.device)
    starts = torch.full_like(positions, count).scatter_reduce(0, slot, positions, reduce="amin")
    ends = torch.zeros_like(positions).scatter_reduce(0, slot, positions + 1, reduce="amax")
    slot_ids = torch.zeros_like(sorted_ids).scatter(0, slot, sorted_ids)
    num_unique = slot[-1:] + 1
    return UniqueSlots(order, starts, ends, slot_ids, positions < num_unique, num_unique)


def reduce_by_digit(contributions: torch.Tensor, digits: torch.Tensor, valid: torch.Tensor, rows: int) -> torch.Tensor:
    """``out[i] = sum_{s valid, digits[s] = i} contributions[s]``, shape ``(rows, width)``, fp32, no atomics.

    The slots are sorted by digit (invalid ones after the last row) and each factor row is one
    segment whose bounds come from ``searchsorted``; the few long segments are split so the
    reduction still spreads over many programs.
    """
    keys = torch.where(valid, digits, rows)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(rows + 1, device=keys.device, dtype=keys.dtype))
    splits = max(1, min(64, len(keys) // (16 * max(rows, 1))))
    return segment_sum(contributions, order, bounds[:-1], bounds[1:], splits=splits)
