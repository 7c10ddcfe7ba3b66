"""The autoregressive model over Kronecker digit sequences (Kwon et al., main paper section 4.1; Figure 11).

For an entry with level tokens ``t_0 .. t_{L-1}`` (``layout.KroneckerLayout.tokens``):

- level 0 reads the learned start vector ``s``; level ``l >= 1`` reads the output of an LSTM (or GRU,
  supplementary section 1) that has consumed the embeddings of ``t_0 .. t_{l-1}``;
- a linear head maps that vector to one score per seed entry, ``a(.)`` makes it a factor
  (``softplus`` as in the paper, or the identity for the signed variant), and the factor is
  L2-normalised over the seed entries: ``F_l = a(z_l) / ||a(z_l)||_2``;
- the entry is ``c * prod_l F_l[t_l]`` with a learned scale ``c = exp(log_scale)``.

Because every level's factor has unit norm, the squared sum of the model over the whole padded
index space is exactly ``c^2`` (the reference's closed form ``||Y||^2 = s^L``). ``squared_norm`` gives
the squared sum over the real (unpadded) region: subtrees entirely inside contribute ``c^2`` times
their prefix weight in closed form, so only prefixes that straddle the boundary are expanded, which
costs ``O(sum_d N_d)`` cell steps (the ``D^2 N_D`` term of Theorem 6).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layout import KroneckerLayout


CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def _select_state(state, index: torch.Tensor):
    if isinstance(state, tuple):
        return tuple(part[:, index] for part in state)
    return state[:, index]


class DigitSequenceModel(nn.Module):
    """``entry(t_0..t_{L-1}) = c * prod_l F_l(t_{<l})[t_l]`` (Kwon et al., section 4.1).

    Parameters: the cell (independent of the input size), one embedding row and one head per seed
    entry of each distinct level seed, the start vector and the scale (Theorem 8).
    """

    def __init__(self, layout: KroneckerLayout, hidden_size: int, cell: str = "lstm", signed: bool = False) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"DigitSequenceModel: cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.layout = layout
        self.signed = signed
        sizes = layout.head_sizes
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer(
            "input_offsets",
            torch.tensor([offsets[head] for head in layout.level_heads], dtype=torch.long),
            persistent=False,
        )
        self.embedding = nn.Embedding(sum(sizes), hidden_size)
        self.cell = CELLS[cell](hidden_size, hidden_size, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(hidden_size, size) for size in sizes)
        self.start = nn.Parameter(4 * torch.rand(sizes[layout.level_heads[0]]) - 2)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def normalized_factor(self, scores: torch.Tensor) -> torch.Tensor:
        """``F = a(z) / ||a(z)||_2`` over the last dimension (``a`` = softplus, or identity when signed)."""
        factor = scores if self.signed else F.softplus(scores)
        return factor / factor.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(factor.dtype).tiny)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Entries for ``tokens`` (``B x L``): ``c * prod_l F_l(t_{<l})[t_l]``.

        The cell runs once per distinct prefix ``t_{<l}`` rather than once per entry and level: entries
        sharing a prefix share its factor (many do near the root), which is the same result for less work.
        """
        heads, sizes = self.layout.level_heads, self.layout.head_sizes
        product = self.normalized_factor(self.start)[tokens[:, 0]]
        node, state = tokens[:, 0], None
        for level in range(1, tokens.shape[1]):
            size = sizes[heads[level - 1]]
            key = node if level == 1 else node * size + tokens[:, level - 1]
            prefixes, node = torch.unique(key, return_inverse=True)
            if level == 1:
                token = prefixes
            else:
                token = prefixes % size
                state = _select_state(state, torch.div(prefixes, size, rounding_mode="floor"))
            step, state = self.cell(self.embedding(token + self.input_offsets[level - 1])[:, None], state)
            factors = self.normalized_factor(self.heads[heads[level]](step[:, 0]))
            product = product * factors[node, tokens[:, level]]
        return self.log_scale.exp() * product

    def squared_norm(self) -> torch.Tensor:
        """``sum`` of squared entries over the real region ``[0, N_1) x ... x [0, N_D)``, exactly.

        Walks the digit tree level by level. A prefix whose index box lies inside the real region
        contributes its prefix weight ``prod F^2`` (its subtree has unit squared sum); a box outside
        contributes nothing; a box that straddles the boundary is expanded with one cell step.
        """
        layout = self.layout
        limits = torch.tensor(layout.shape, device=self.start.device)
        dtype = self.start.dtype
        lower = torch.zeros(1, layout.order, dtype=torch.long, device=limits.device)
        span = torch.tensor(layout.padded_shape, device=limits.device)
        if bool((span <= limits).all()):
            return self.log_scale.exp() ** 2
        weight = torch.ones(1, dtype=dtype, device=limits.device)
        total = torch.zeros((), dtype=dtype, device=limits.device)
        state, outputs = None, None
        for level in range(layout.num_levels):
            if level == 0:
                factors = self.normalized_factor(self.start)[None]
            else:
                factors = self.normalized_factor(self.heads[layout.level_heads[level]](outputs))
            child_weight = weight[:, None] * factors.square()
            digits = layout.token_digits(level).to(limits.device)
            span = torch.tensor(layout.block_sizes(level), device=limits.device)
            child_lower = lower[:, None, :] + digits[None] * span
            inside = (child_lower + span <= limits).all(dim=-1)
            outside = (child_lower >= limits).any(dim=-1)
            total = total + child_weight[inside].sum()
            parent, token = torch.nonzero(~inside & ~outside, as_tuple=True)
            if parent.numel() == 0:
                break
            weight = child_weight[parent, token]
            lower = child_lower[parent, token]
            embedded = self.embedding(token + self.input_offsets[level])[:, None]
            state = None if state is None else _select_state(state, parent)
            step, state = self.cell(embedded, state)
            outputs = step[:, 0]
        return self.log_scale.exp() ** 2 * total
