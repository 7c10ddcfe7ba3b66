"""Order optimization: pair swaps of rows/columns (mode slices) proposed by min-hash (Kwon et al., section 4.2).

Each pass over a mode ``d``:

1. **Level.** Pick a digit level ``l`` of mode ``d``, the least significant with probability 1/2, the
   next with 1/4, and so on. Positions that differ only in digit ``l`` are *siblings*: they share every
   Kronecker factor except the level-``l`` one.
2. **Proposals.** For every sibling group pick an *anchor* position and a *mate* position. Anchors are
   sorted by the min-hash of their slice's non-zero pattern (similar slices become neighbours), and
   for each consecutive pair ``(a, b)`` the slice at ``a`` is proposed to swap with the mate of ``b``,
   so that similar slices become siblings. All proposed swaps touch distinct slices, so their effects on
   the error add up and are decided independently.
3. **Acceptance.** A swap changes the squared error by ``delta = -2 sum_{nnz of both slices} x (y_after -
   y_before)`` exactly (the model's squared sum over the real region does not change under a
   permutation of real positions), costing ``O(nnz of the two slices)`` model evaluations. It is
   accepted with probability ``min(1, exp(-gamma * delta))``; ``gamma = inf`` is hill climbing (only
   swaps that do not increase the error, supplementary section 6, Table 4).

Orders map each original index to a padded position of its mode (a permutation of ``[0, N_d)``);
padding positions ``[N_d, n_d^L_d)`` stay empty and are never evaluated.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .inputs import SparseInput
from .layout import KroneckerLayout


HASH_PRIME = 2**31 - 1


def minhash_signatures(data: SparseInput, mode: int, generator: torch.Generator) -> torch.Tensor:
    """Min-hash of every mode-``mode`` slice's set of non-zero coordinates in the other modes.

    ``h(key) = (a * key + b) mod p`` with a random ``a, b`` (a universal hash, so the min over a slice
    is a min-hash); slices without non-zeros get ``p``.
    """
    key = torch.zeros(data.nnz, dtype=torch.long)
    for other in range(data.order):
        if other != mode:
            key = (key * data.shape[other] + data.indices[other]) % HASH_PRIME
    a = int(torch.randint(1, HASH_PRIME, (), generator=generator))
    b = int(torch.randint(0, HASH_PRIME, (), generator=generator))
    hashed = (a * key + b) % HASH_PRIME
    signatures = torch.full((data.shape[mode],), HASH_PRIME, dtype=torch.long)
    return signatures.scatter_reduce(0, data.indices[mode], hashed, reduce="amin")


def _sample_level(levels: int, generator: torch.Generator) -> int:
    uniform = float(torch.rand((), generator=generator, dtype=torch.float64))
    from_last = min(int(-math.log2(max(uniform, 1e-300))), levels - 1)
    return levels - 1 - from_last


def propose_swaps(
    order: torch.Tensor, layout: KroneckerLayout, mode: int, signatures: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint pairs ``(first[k], second[k])`` of mode-``mode`` slices to swap (steps 1-2 above)."""
    size, base, levels = layout.shape[mode], layout.seed_shape[mode], layout.mode_levels[mode]
    empty = torch.zeros(0, dtype=torch.long)
    if levels == 0 or size < 2:
        return empty, empty
    block = base ** (levels - 1 - _sample_level(levels, generator))
    groups = torch.arange(base**levels // base)
    group_base = torch.div(groups, block, rounding_mode="floor") * block * base + groups % block
    anchor_digit = torch.randint(0, base, groups.shape, generator=generator)
    mate_digit = (anchor_digit + 1 + torch.randint(0, base - 1, groups.shape, generator=generator)) % base
    anchor, mate = group_base + anchor_digit * block, group_base + mate_digit * block
    valid = (anchor < size) & (mate < size)
    slice_at = torch.empty_like(order)
    slice_at[order] = torch.arange(size)
    anchors, mates = slice_at[anchor[valid]], slice_at[mate[valid]]
    shuffle = torch.randperm(anchors.numel(), generator=generator)
    ranked = shuffle[torch.sort(signatures[anchors[shuffle]], stable=True).indices]
    pairs = ranked.numel() // 2
    left, right = ranked[0 : 2 * pairs : 2], ranked[1 : 2 * pairs : 2]
    flip = torch.rand(pairs, generator=generator) < 0.5
    left, right = torch.where(flip, right, left), torch.where(flip, left, right)
    return anchors[left], mates[right]


def reorder_mode(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    data: SparseInput,
    orders: list[torch.Tensor],
    layout: KroneckerLayout,
    mode: int,
    gamma: float,
    generator: torch.Generator,
) -> tuple[int, float]:
    """One proposal/acceptance pass over mode ``mode``; updates ``orders[mode]`` in place.

    ``evaluate(positions)`` returns the model's entries at padded ``positions`` (``D x B``).
    Returns the number of accepted swaps and the exact change of the squared error they caused.
    """
    signatures = minhash_signatures(data, mode, generator)
    first, second = propose_swaps(orders[mode], layout, mode, signatures, generator)
    if first.numel() == 0:
        return 0, 0.0
    size = layout.shape[mode]
    partner = torch.full((size,), -1, dtype=torch.long)
    partner[first], partner[second] = second, first
    pair = torch.full((size,), -1, dtype=torch.long)
    pair[first] = pair[second] = torch.arange(first.numel())
    touched = partner[data.indices[mode]] >= 0
    indices, values = data.indices[:, touched], data.values[touched]
    before = torch.stack([orders[axis][indices[axis]] for axis in range(data.order)])
    after = before.clone()
    after[mode] = orders[mode][partner[indices[mode]]]
    change = -2 * values * (evaluate(after).double() - evaluate(before).double())
    delta = torch.zeros(first.numel(), dtype=torch.float64).index_add_(0, pair[indices[mode]], change)
    threshold = torch.exp(-gamma * delta.clamp_min(0)) if math.isfinite(gamma) else torch.zeros_like(delta)
    accepted = (delta <= 0) | (torch.rand(delta.shape, generator=generator, dtype=torch.float64) < threshold)
    first, second = first[accepted], second[accepted]
    moved = orders[mode][first].clone()
    orders[mode][first] = orders[mode][second]
    orders[mode][second] = moved
    return int(accepted.sum()), float(delta[accepted].sum())
