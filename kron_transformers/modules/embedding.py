"""Drop-in replacements for ``nn.Embedding`` and the tied output head (ARCHITECTURE.md layer 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..factorizations import (
    Factorization,
    KroneckerSum,
    LowRankFactorization,
    Word2KetFactorization,
    balanced_factor_shapes,
    build_factorization,
)
from ..factorizations.shapes import VOCAB_PADDING_TOLERANCE, balanced_factors
from .dense_view import dense_weight_property


def zero_index(tensor: torch.Tensor, index: int | None, dim: int) -> torch.Tensor:
    """``tensor`` with position ``index`` along ``dim`` set to 0 (out of place, differentiable)."""
    if index is None:
        return tensor
    shape = [1] * tensor.dim()
    shape[dim] = tensor.shape[dim]
    keep = torch.ones(shape, dtype=tensor.dtype, device=tensor.device)
    keep.view(-1)[index] = 0
    return tensor * keep


def share_factorization_buffers(module: nn.Module) -> None:
    """Save the factors' buffers (CCE's pointers) once: under the first embedding built on them.

    Parameters shared by a tied head or by embeddings sharing one table (T5's encoder/decoder)
    are deduplicated through transformers' tied keys, which only take parameters; a second
    module over the same factorization leaves the buffers out of its ``state_dict`` and does not
    expect them when loading.
    """
    if module.factorization.__dict__.setdefault("_buffers_saved_by", id(module)) != id(module):
        module.register_state_dict_post_hook(_drop_factorization_buffers)
        module.register_load_state_dict_pre_hook(_keep_factorization_buffers)


def _drop_factorization_buffers(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, _ in module.factorization.named_buffers():
        state_dict.pop(f"{prefix}factorization.{name}", None)


def _keep_factorization_buffers(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Loading: this module's copy of the shared buffers is the buffer itself (the owner loads it)."""
    for name, buffer in module.factorization.named_buffers():
        state_dict.setdefault(f"{prefix}factorization.{name}", buffer)


def checked_padding_idx(module_name: str, padding_idx: int | None, num_embeddings: int) -> int | None:
    """``padding_idx`` in ``[0, num_embeddings)`` (negative counts from the end, as ``nn.Embedding``), or ``None``."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"{module_name}: padding_idx {padding_idx} is outside the vocabulary of {num_embeddings} rows"
        )
    return padding_idx % num_embeddings


class FactorizedTable(nn.Module):
    """What every module over one factorized ``(num_embeddings, embedding_dim)`` table exposes (embeddings, bags):
    the dense table with the padding row zero, a read-only ``weight`` and the parameter count."""

    factorization: Factorization
    padding_idx: int | None

    def materialize(self) -> torch.Tensor:
        """Dense ``(num_embeddings, embedding_dim)`` table, padding row zero (an embedding's scale not applied)."""
        return zero_index(self.factorization.materialize(), self.padding_idx, 0)

    weight = dense_weight_property(lambda module: (module.factorization.rows, module.factorization.cols))

    def num_parameters(self) -> int:
        return self.factorization.num_parameters()


class FactorizedEmbedding(FactorizedTable):
    """An embedding table ``E`` (``num_embeddings x embedding_dim``) held as a ``Factorization``.

    ``forward(ids) = E[ids]`` gathered lazily (the table is never formed), with the row of
    ``padding_idx`` zero and receiving no gradient, as ``nn.Embedding``. ``embed_scale``
    reproduces transformers' scaled word embeddings (BART, M2M100, ...: ``E[ids] * scale``).
    """

    def __init__(
        self, factorization: Factorization, padding_idx: int | None = None, embed_scale: float | None = None
    ) -> None:
        super().__init__()
        self.factorization = factorization
        self.num_embeddings = factorization.rows
        self.embedding_dim = factorization.cols
        self.padding_idx = checked_padding_idx(type(self).__name__, padding_idx, self.num_embeddings)
        self.embed_scale = embed_scale
        share_factorization_buffers(self)

    @classmethod
    def from_structure(
        cls,
        structure: dict[str, Any],
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        embed_scale: float | None = None,
    ) -> FactorizedEmbedding:
        """Rebuild an embedding from a recorded ``Factorization.structure()`` (random values)."""
        factorization = build_factorization(structure, num_embeddings, embedding_dim)
        return cls.wrap(factorization, padding_idx, embed_scale)

    @staticmethod
    def wrap(
        factorization: Factorization, padding_idx: int | None = None, embed_scale: float | None = None
    ) -> FactorizedEmbedding:
        """An embedding around an existing factorization, typed by it (``KronEmbedding`` for a Kronecker sum, ...)."""
        module = FactorizedEmbedding.__new__(EMBEDDING_CLASSES.get(type(factorization), FactorizedEmbedding))
        FactorizedEmbedding.__init__(module, factorization, padding_idx, embed_scale)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.factorization.cached_gather_rows(input_ids)
        if self.padding_idx is not None:
            rows = rows.masked_fill((input_ids == self.padding_idx).unsqueeze(-1), 0.0)
        return rows * self.embed_scale if self.embed_scale is not None else rows

    def extra_repr(self) -> str:
        extra = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        extra += f", embed_scale={self.embed_scale}" if self.embed_scale is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{extra}"


class KronEmbedding(FactorizedEmbedding):
    """word2ketXS / Shapeshifter embedding: ``E = sum_k ⊗_j F_jk`` (Panahi, eq. 3.4).

    ```py
    emb = KronEmbedding(30000, 256, rank=2, order=4)   # vocabulary padded to a balanced grid
    ```
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        order: int = 2,
        factor_shapes: Sequence[Sequence[int]] | None = None,
        padding_idx: int | None = None,
    ) -> None:
        shapes = (
            factor_shapes
            if factor_shapes is not None
            else balanced_factor_shapes(num_embeddings, embedding_dim, order, True, False, VOCAB_PADDING_TOLERANCE)
        )
        super().__init__(KroneckerSum(num_embeddings, embedding_dim, shapes, rank), padding_idx)


class Word2KetEmbedding(FactorizedEmbedding):
    """word2ket: each token's vector ``sum_k ⊗_j v_jk`` (Panahi, eq. 3.3), balanced tree, optional LayerNorm."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        order: int = 2,
        leaf_dims: Sequence[int] | None = None,
        layer_norm: bool = False,
        padding_idx: int | None = None,
    ) -> None:
        dims = leaf_dims if leaf_dims is not None else balanced_factors(embedding_dim, order)
        super().__init__(Word2KetFactorization(num_embeddings, embedding_dim, dims, rank, layer_norm), padding_idx)


class LowRankEmbedding(FactorizedEmbedding):
    """``E = U V`` (the low-rank baseline): rows gathered as ``U[ids] V``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None) -> None:
        super().__init__(LowRankFactorization(num_embeddings, embedding_dim, rank), padding_idx)


EMBEDDING_CLASSES: dict[type[Factorization], type[FactorizedEmbedding]] = {
    KroneckerSum: KronEmbedding,
    Word2KetFactorization: Word2KetEmbedding,
    LowRankFactorization: LowRankEmbedding,
}


class TiedFactorizedHead(FactorizedTable):
    """Output head tied to a factorized embedding: ``logits = h E^T (+ bias)`` from the same factors.

    The ``vocab x dim`` table is never formed when the factorization's structured product is
    cheaper (Kronecker sums contract ``h`` with each factor, cost ``~ r sum_j ...`` instead of
    ``V * dim``). For an order-2 Kronecker table ``E = sum_k A_k ⊗ B_k`` the logits are the same op as
    a ``KronLinear`` with ``W = E`` (the dispatched ``kernels.kron_matmul``: the fused Triton kernel on
    CUDA). The cost model (``factorizations.cost``) picks materialize-then-matmul instead where that is
    faster (many tokens, high rank or tiny factors), and under ``kt.prepare_for_inference`` the logits
    come from the embedding's cached table unless the factored product is still faster. The logit of
    ``padding_idx`` is 0, as with the zero padding row of a dense tie.
    """

    def __init__(self, embedding: FactorizedEmbedding, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.factorization = embedding.factorization
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self.padding_idx = embedding.padding_idx
        self.register_parameter("bias", bias)
        share_factorization_buffers(self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = zero_index(self.factorization.cached_matmul(hidden_states), self.padding_idx, -1)
        return logits + self.bias if self.bias is not None else logits

    def num_parameters(self) -> int:
        """Own parameters only (the bias); the factors belong to the embedding."""
        return self.bias.numel() if self.bias is not None else 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, tied"
