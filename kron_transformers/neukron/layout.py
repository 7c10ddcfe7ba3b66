"""Hierarchical Kronecker digits of an entry's position (Kwon et al., main paper section 4.1; supplementary section 3).

A matrix of ``N x M`` (or an order-D tensor ``N_1 x ... x N_D``) is padded to ``n_d ** L_d`` along
mode ``d``, where ``n_d`` is the seed size of that mode and ``L_d = ceil(log_{n_d} N_d)``. Position
``p_d`` is written in base ``n_d`` with the most significant digit first (the convention of
REFERENCES.md section 0: the first Kronecker factor holds the most significant digit). Level ``l``
of the sequence combines the level-``l`` digits of every mode into one token, in mixed radix with the
first mode most significant, so a ``2 x 2`` seed gives tokens ``t_l = i_l * 2 + j_l``.

Modes with fewer levels than ``L = max_d L_d`` have no digit at the trailing levels (extent 1 there),
exactly as the reference pads the row digits of a wide matrix with a second, ``1 x n_col`` seed. Levels
with the same per-mode extents share one output head; there are at most ``D + 1`` distinct extents,
which is where the ``Theta(2 + 2^2 + ... + 2^D)`` head parameters of Theorem 8 come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _levels_for(size: int, base: int) -> int:
    levels, capacity = 0, 1
    while capacity < size:
        capacity *= base
        levels += 1
    return levels


@dataclass(frozen=True)
class KroneckerLayout:
    """The digit layout of a sparse matrix/tensor of ``shape`` under a ``seed_shape`` seed.

    ``level_extents[l][d]`` is the number of values digit ``d`` takes at level ``l`` (``n_d`` or 1),
    ``level_heads[l]`` the output head (seed) used at level ``l`` and ``head_sizes[g]`` the number of
    entries of seed ``g``.
    """

    shape: tuple[int, ...]
    seed_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.shape) < 2:
            raise ValueError(f"KroneckerLayout: need an order >= 2 shape, got {self.shape}")
        if len(self.seed_shape) != len(self.shape):
            raise ValueError(
                f"KroneckerLayout: seed_shape {self.seed_shape} has {len(self.seed_shape)} modes but the input "
                f"of shape {self.shape} has {len(self.shape)}; give one seed size per mode, e.g. "
                f"seed_shape={(2,) * len(self.shape)}"
            )
        if any(not isinstance(n, int) or n < 2 for n in self.seed_shape):
            raise ValueError(f"KroneckerLayout: every seed size must be an int >= 2, got {self.seed_shape}")
        if any(not isinstance(n, int) or n < 1 for n in self.shape):
            raise ValueError(f"KroneckerLayout: every size must be a positive int, got {self.shape}")
        if all(n == 1 for n in self.shape):
            raise ValueError(f"KroneckerLayout: shape {self.shape} has a single entry; nothing to compress")

    @property
    def order(self) -> int:
        return len(self.shape)

    @property
    def mode_levels(self) -> tuple[int, ...]:
        """``L_d = ceil(log_{n_d} N_d)``: the number of digits of mode ``d``."""
        return tuple(_levels_for(size, base) for size, base in zip(self.shape, self.seed_shape))

    @property
    def num_levels(self) -> int:
        """``L = max_d L_d``: the sequence length (Theorem 5: ``Theta(log N_max)`` for a fixed order)."""
        return max(self.mode_levels)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(base**levels for base, levels in zip(self.seed_shape, self.mode_levels))

    @property
    def level_extents(self) -> tuple[tuple[int, ...], ...]:
        return tuple(
            tuple(base if level < levels else 1 for base, levels in zip(self.seed_shape, self.mode_levels))
            for level in range(self.num_levels)
        )

    @property
    def head_extents(self) -> tuple[tuple[int, ...], ...]:
        """The distinct per-level seed shapes, in order of first use."""
        return tuple(dict.fromkeys(self.level_extents))

    @property
    def head_sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(extents) for extents in self.head_extents)

    @property
    def level_heads(self) -> tuple[int, ...]:
        heads = {extents: index for index, extents in enumerate(self.head_extents)}
        return tuple(heads[extents] for extents in self.level_extents)

    def block_sizes(self, level: int) -> tuple[int, ...]:
        """Positions spanned along each mode by one digit value at ``level`` (``n_d^(L_d - level - 1)``)."""
        return tuple(base ** max(levels - level - 1, 0) for base, levels in zip(self.seed_shape, self.mode_levels))

    def tokens(self, positions: torch.Tensor) -> torch.Tensor:
        """Level tokens of padded positions ``positions`` (``D x B``): a ``B x L`` long tensor.

        ``t_l = sum_d digit_{d,l} * prod_{e > d} extent_{e,l}`` with ``digit_{d,l}`` the ``l``-th base-``n_d``
        digit of ``p_d``, most significant first (0 where mode ``d`` has no digit at level ``l``).
        """
        tokens = torch.zeros(positions.shape[1], self.num_levels, dtype=torch.long, device=positions.device)
        for level, extents in enumerate(self.level_extents):
            blocks = self.block_sizes(level)
            for mode, extent in enumerate(extents):
                if extent == 1:
                    continue
                digit = torch.div(positions[mode], blocks[mode], rounding_mode="floor") % extent
                tokens[:, level] = tokens[:, level] * extent + digit
        return tokens

    def token_digits(self, level: int) -> torch.Tensor:
        """``head_size x D``: the digit of every mode for each token value at ``level``."""
        extents = self.level_extents[level]
        grid = torch.meshgrid(*[torch.arange(extent) for extent in extents], indexing="ij")
        return torch.stack([axis.reshape(-1) for axis in grid], dim=1)
