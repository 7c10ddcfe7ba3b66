"""Parameter containers for one structured weight matrix (ARCHITECTURE.md layer 1)."""

from ..kernels import mixed_radix_digits
from .base import FACTORIZATIONS, Factorization, build_factorization, register_factorization
from .cce import CCEFactorization
from .kpd_patterns import KPDPatternFactorization
from .kronecker import KPDFactorization, KroneckerSum
from .low_rank import LowRankFactorization
from .shapes import balanced_factor_shapes, max_kronecker_rank
from .tensor_train import TensorTrainFactorization, tt_shapes
from .word2ket import Word2KetFactorization


__all__ = [
    "FACTORIZATIONS",
    "CCEFactorization",
    "Factorization",
    "KPDFactorization",
    "KPDPatternFactorization",
    "KroneckerSum",
    "LowRankFactorization",
    "Word2KetFactorization",
    "balanced_factor_shapes",
    "build_factorization",
    "max_kronecker_rank",
    "mixed_radix_digits",
    "register_factorization",
]
__all__ += ["TensorTrainFactorization", "tt_shapes"]
