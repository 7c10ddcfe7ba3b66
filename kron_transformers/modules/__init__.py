"""The ``nn.Module``s users see (ARCHITECTURE.md layer 3)."""

from .block_sparse import BlockSparseLinear
from .cce import CCEEmbedding, CCEEmbeddingBag
from .embedding import (
    FactorizedEmbedding,
    KronEmbedding,
    LowRankEmbedding,
    TiedFactorizedHead,
    Word2KetEmbedding,
)
from .linear import (
    CONV1D_LAYOUT,
    LINEAR_LAYOUT,
    FactorizedLinear,
    KPDLinear,
    KPDPatternLinear,
    KronLinear,
    LowRankLinear,
)
from .tensor_train import TTEmbedding, TTEmbeddingBag


COMPRESSED_MODULES = (FactorizedLinear, FactorizedEmbedding, TiedFactorizedHead, BlockSparseLinear)

__all__ = [
    "COMPRESSED_MODULES",
    "BlockSparseLinear",
    "CCEEmbedding",
    "CCEEmbeddingBag",
    "CONV1D_LAYOUT",
    "LINEAR_LAYOUT",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "KPDLinear",
    "KPDPatternLinear",
    "KronEmbedding",
    "KronLinear",
    "LowRankEmbedding",
    "LowRankLinear",
    "TiedFactorizedHead",
    "Word2KetEmbedding",
]
__all__ += ["TTEmbedding", "TTEmbeddingBag"]
