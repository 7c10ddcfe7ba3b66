"""TT-Rec embedding modules: ``nn.Embedding`` / ``nn.EmbeddingBag`` drop-ins over a tensor train (Yin et al.).

```py
emb = TTEmbedding(50000, 768)                      # shapes and ranks chosen and logged
bag = TTEmbeddingBag(10**6, 64, tt_ranks=16, cache_fraction=0.001, mode="sum")
out = bag(ids, offsets)                            # nn.EmbeddingBag semantics
kt.on_train_step(model, step, optimizer)           # after optimizer.step(): cache warm-up / refresh
```
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..factorizations.tensor_train import (
    DEFAULT_TT_RANK,
    SAMPLED_GAUSSIAN,
    TensorTrainFactorization,
    tt_num_parameters,
)
from ..factorizations.tensor_train import tt_shapes as automatic_tt_shapes
from ..kernels import tt_embedding_bag
from .bag import FactorizedEmbeddingBag, check_bag_arguments
from .embedding import EMBEDDING_CLASSES, FactorizedEmbedding


logger = logging.getLogger(__name__)


def build_tensor_train(
    owner: str,
    num_embeddings: int,
    embedding_dim: int,
    num_cores: int,
    tt_shapes: Sequence[Sequence[int]] | None,
    tt_ranks: int | Sequence[int],
    init: str,
    cache_fraction: float,
    cache_warmup_steps: int,
    cache_refresh_every: int,
    cache_write_back_steps: int,
) -> TensorTrainFactorization:
    """The factorization of a TT module, its shapes, ranks and cache size resolved and logged."""
    for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    if not isinstance(cache_fraction, (int, float)) or not 0.0 <= cache_fraction <= 1.0:
        raise ValueError(f"{owner}: cache_fraction must be a number in [0, 1], got {cache_fraction!r}")
    if tt_shapes is None:
        shapes = automatic_tt_shapes(num_embeddings, embedding_dim, num_cores)
    elif len(tt_shapes) != num_cores:
        raise ValueError(f"{owner}: {len(tt_shapes)} tt_shapes given for num_cores={num_cores}")
    else:
        shapes = tt_shapes
    cache_size = round(cache_fraction * num_embeddings)
    factorization = TensorTrainFactorization(
        num_embeddings,
        embedding_dim,
        shapes,
        tt_ranks,
        init,
        cache_size,
        cache_warmup_steps,
        cache_refresh_every,
        cache_write_back_steps,
    )
    parameters = tt_num_parameters(factorization.tt_shapes, factorization.tt_ranks)
    logger.info(
        "%s(%d, %d): TT shapes %s, TT ranks %s, %d core parameters (%.1fx smaller than dense), cache of %d rows",
        owner,
        num_embeddings,
        embedding_dim,
        " ⊗ ".join(f"{m}x{n}" for m, n in factorization.tt_shapes),
        factorization.tt_ranks,
        parameters,
        num_embeddings * embedding_dim / parameters,
        cache_size,
    )
    return factorization


def check_ids(owner: str, ids: torch.Tensor, num_embeddings: int) -> None:
    """Raise for non-integer ids or ids outside ``[0, num_embeddings)`` (one host sync on GPU)."""
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{owner}: input must hold int32/int64 ids, got {ids.dtype}")
    if torch.compiler.is_compiling():  # no host sync in a compiled graph: a device-side assertion instead
        in_range = ((ids >= 0) & (ids < num_embeddings)).all()
        torch._assert_async(in_range, f"{owner}: ids must be in [0, {num_embeddings})")
        return
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
        raise ValueError(
            f"{owner}: ids must be in [0, {num_embeddings}), got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def _describe(factorization: TensorTrainFactorization) -> str:
    shapes = " ⊗ ".join(f"{m}x{n}" for m, n in factorization.tt_shapes)
    cache = f", cache_size={factorization.cache_size}" if factorization.cache_size else ""
    return f"tt_shapes={shapes}, tt_ranks={factorization.tt_ranks}, init={factorization.init}{cache}"


class TTEmbedding(FactorizedEmbedding):
    """``nn.Embedding`` whose table is a tensor train (Yin et al., eq. 2), with an optional LFU cache.

    ``forward(ids)`` takes ids of any shape (e.g. ``(batch, seq)``) and builds each distinct row
    once from the cores, never forming the table. Without ``tt_shapes`` the vocabulary is padded
    and the embedding dimension factored exactly (``tt_shapes``); ``tt_ranks`` is an int or one per
    inner bond, clipped to the largest useful rank. ``init``: ``"sampled_gaussian"`` (Yin et al.,
    Algorithm 3: entries ~ ``N(0, 1/3n)``) or ``"glorot"``; ``from_pretrained`` runs TT-SVD.

    With ``cache_fraction > 0`` the ``cache_fraction * num_embeddings`` most frequent ids of the
    training batches get uncompressed trainable rows (Yin et al., section 4.2), counted for
    ``cache_warmup_steps`` steps and refreshed every ``cache_refresh_every`` (0: never); call
    ``kt.on_train_step(model, step, optimizer)`` after each ``optimizer.step()`` (or use
    ``kt.KronTrainingCallback`` with ``Trainer``). The hook lives on the ``factorization``
    submodule, so an embedding shared by several modules is handled once per step.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        num_cores: int = 3,
        tt_shapes: Sequence[Sequence[int]] | None = None,
        tt_ranks: int | Sequence[int] = DEFAULT_TT_RANK,
        init: str = SAMPLED_GAUSSIAN,
        padding_idx: int | None = None,
        cache_fraction: float = 0.0,
        cache_warmup_steps: int = 100,
        cache_refresh_every: int = 1000,
        cache_write_back_steps: int = 20,
    ) -> None:
        factorization = build_tensor_train(
            type(self).__name__,
            num_embeddings,
            embedding_dim,
            num_cores,
            tt_shapes,
            tt_ranks,
            init,
            cache_fraction,
            cache_warmup_steps,
            cache_refresh_every,
            cache_write_back_steps,
        )
        super().__init__(factorization, padding_idx)

    @classmethod
    def from_pretrained(
        cls,
        embeddings: torch.Tensor,
        *,
        tt_ranks: int | Sequence[int] = DEFAULT_TT_RANK,
        freeze: bool = False,
        **kwargs,
    ) -> TTEmbedding:
        """TT-SVD of a pretrained ``(num_embeddings, embedding_dim)`` table, as ``nn.Embedding.from_pretrained``."""
        if embeddings.dim() != 2:
            raise ValueError(f"TTEmbedding.from_pretrained: embeddings must be 2-D, got {tuple(embeddings.shape)}")
        module = cls(*embeddings.shape, tt_ranks=tt_ranks, **kwargs).to(embeddings.device, embeddings.dtype)
        error = module.factorization.fit(embeddings.detach())
        logger.info("TTEmbedding.from_pretrained: TT-SVD relative error %.4f", error)
        module.requires_grad_(not freeze)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_ids(type(self).__name__, input_ids, self.num_embeddings)
        if self.training:
            self.factorization.record_lookups(input_ids, self.padding_idx)
        return super().forward(input_ids)

    @property
    def cache_hit_rate(self) -> float:
        """Share of training lookups since the last cache population served by the cache."""
        return self.factorization.cache_hit_rate

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self.factorization)}"


EMBEDDING_CLASSES[TensorTrainFactorization] = TTEmbedding


class TTEmbeddingBag(FactorizedEmbeddingBag):
    """``nn.EmbeddingBag`` over a tensor-train table (TT-Rec's TT-EmbeddingBag, Yin et al., section 4.1).

    ``forward(input, offsets=None, per_sample_weights=None)`` has ``nn.EmbeddingBag``'s semantics
    (1-D input with offsets or 2-D ``(bags, ids)``, modes ``sum``/``mean``/``max``,
    ``per_sample_weights`` with ``sum``, ``padding_idx`` entries left out, ``include_last_offset``);
    the distinct ids of a batch are built once from the cores (``modules.bag.embedding_bag_lookup``).
    Shapes, ranks, init and the LFU cache as ``TTEmbedding``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        num_cores: int = 3,
        tt_shapes: Sequence[Sequence[int]] | None = None,
        tt_ranks: int | Sequence[int] = DEFAULT_TT_RANK,
        init: str = SAMPLED_GAUSSIAN,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        cache_fraction: float = 0.0,
        cache_warmup_steps: int = 100,
        cache_refresh_every: int = 1000,
        cache_write_back_steps: int = 20,
    ) -> None:
        table = build_tensor_train(
            type(self).__name__,
            num_embeddings,
            embedding_dim,
            num_cores,
            tt_shapes,
            tt_ranks,
            init,
            cache_fraction,
            cache_warmup_steps,
            cache_refresh_every,
            cache_write_back_steps,
        )
        super().__init__(table, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset)

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_ids(type(self).__name__, input, self.num_embeddings)
        if self.training:
            self.factorization.record_lookups(input, self.padding_idx)
        if self._fused_bag_applies(input):
            check_bag_arguments(type(self).__name__, input, offsets, per_sample_weights, self.mode)
            cores = list(self.factorization.cores)
            return tt_embedding_bag(input, offsets, per_sample_weights, cores, self.embedding_dim, self.mode)
        return super().forward(input, offsets, per_sample_weights)

    def _fused_bag_applies(self, input: torch.Tensor) -> bool:
        """Whether the bag is the plain TT-EmbeddingBag op (``kernels.tt_embedding_bag``, a fused kernel on CUDA):
        no cache rows, no padding id, sum/mean pooling, ``include_last_offset=False``."""
        plain = not self.factorization.cache_size and self.padding_idx is None and not self.include_last_offset
        return plain and self.mode in ("sum", "mean") and input.dim() in (1, 2)

    @property
    def cache_hit_rate(self) -> float:
        """Share of training lookups since the last cache population served by the cache."""
        return self.factorization.cache_hit_rate

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self.factorization)}"
