"""kron_transformers: Kronecker- and tensor-factorized layers for Hugging Face Transformers.

```py
import kron_transformers as kt
model = kt.compress_model(model, kt.KronConfig(attention=kt.Shapeshifter(rank=4), init="svd"))
print(kt.report(model))
```
"""

from . import cce, kpd, neukron, training
from .calibration import CalibrationStats, calibrate
from .config import (
    CCE,
    KPD,
    PHM,
    KronConfig,
    Kronecker,
    LowRank,
    MethodSpec,
    Shapeshifter,
    TensorTrain,
    Word2Ket,
    Word2KetXS,
)
from .distill import distill
from .integration import KronHfQuantizer, from_pretrained, push_to_hub, render_model_card, write_model_card
from .modules import (
    BlockSparseLinear,
    CCEEmbedding,
    CCEEmbeddingBag,
    FactorizedEmbedding,
    FactorizedLinear,
    KPDLinear,
    KPDPatternLinear,
    KronEmbedding,
    KronLinear,
    LowRankEmbedding,
    LowRankLinear,
    TiedFactorizedHead,
    TTEmbedding,
    TTEmbeddingBag,
    Word2KetEmbedding,
)
from .reconstruct import ReconstructionReport, reconstruct
from .report import CompressionReport, report
from .surgery import applied_config, compress_model, decompress_model
from .training import KronTrainingCallback, on_train_step


__version__ = "0.1.0"

__all__ = [
    "KPD",
    "PHM",
    "CompressionReport",
    "FactorizedEmbedding",
    "FactorizedLinear",
    "BlockSparseLinear",
    "CalibrationStats",
    "KPDLinear",
    "KPDPatternLinear",
    "KronConfig",
    "KronEmbedding",
    "KronHfQuantizer",
    "KronLinear",
    "KronTrainingCallback",
    "Kronecker",
    "LowRank",
    "LowRankEmbedding",
    "LowRankLinear",
    "MethodSpec",
    "Shapeshifter",
    "TiedFactorizedHead",
    "Word2Ket",
    "Word2KetEmbedding",
    "Word2KetXS",
    "__version__",
    "applied_config",
    "calibrate",
    "compress_model",
    "decompress_model",
    "distill",
    "kpd",
    "on_train_step",
    "from_pretrained",
    "push_to_hub",
    "render_model_card",
    "report",
    "training",
    "write_model_card",
    "neukron",
    "CCE",
    "CCEEmbedding",
    "CCEEmbeddingBag",
    "cce",
]
__all__ += ["TensorTrain", "TTEmbedding", "TTEmbeddingBag"]
__all__ += ["ReconstructionReport", "reconstruct"]
