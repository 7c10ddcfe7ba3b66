"""The ``nn.Module``s users see (DESIGN.md layer 3)."""

from .embedding import (
    FactorizedEmbedding,
    KronEmbedding,
    LowRankEmbedding,
    TiedFactorizedHead,
    Word2KetEmbedding,
)
from .linear import CONV1D_LAYOUT, LINEAR_LAYOUT, FactorizedLinear, KPDLinear, KronLinear, LowRankLinear


COMPRESSED_MODULES = (FactorizedLinear, FactorizedEmbedding, TiedFactorizedHead)

__all__ = [
    "COMPRESSED_MODULES",
    "CONV1D_LAYOUT",
    "LINEAR_LAYOUT",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "KPDLinear",
    "KronEmbedding",
    "KronLinear",
    "LowRankEmbedding",
    "LowRankLinear",
    "TiedFactorizedHead",
    "Word2KetEmbedding",
]
