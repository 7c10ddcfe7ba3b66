"""kron_transformers: Kronecker- and tensor-factorized layers for Hugging Face Transformers.

```py
import kron_transformers as kt
model = kt.compress_model(model, kt.KronConfig(attention=kt.Shapeshifter(rank=4), init="svd"))
print(kt.report(model))
```

Every name below is imported on first use, so ``import kron_transformers`` (and the CLI's ``--help``)
loads neither torch nor transformers. The ``"kron"`` quantizer registers itself with transformers as
soon as ``transformers.modeling_utils`` is imported (``transformers_hook``), so ``from_pretrained`` of a
compressed checkpoint works once ``kron_transformers`` is imported.
"""

import importlib
import sys
from types import ModuleType

from .transformers_hook import register_with_transformers


__version__ = "0.1.0"

_SUBMODULES = ("cce", "kpd", "neukron", "training")

# exported name -> the submodule defining it (add new exports here)
_EXPORTS = {
    "CalibrationStats": "calibration",
    "calibrate": "calibration",
    "CCE": "config",
    "KPD": "config",
    "PHM": "config",
    "KronConfig": "config",
    "Kronecker": "config",
    "LowRank": "config",
    "MethodSpec": "config",
    "Shapeshifter": "config",
    "TensorTrain": "config",
    "Word2Ket": "config",
    "Word2KetXS": "config",
    "distill": "distill",
    "set_cost_model": "factorizations.cost",
    "InferencePlan": "inference",
    "prepare_for_inference": "inference",
    "KronHfQuantizer": "integration",
    "compress_pretrained": "integration",
    "from_pretrained": "integration",
    "push_to_hub": "integration",
    "render_model_card": "integration",
    "write_model_card": "integration",
    "BlockSparseLinear": "modules",
    "CCEEmbedding": "modules",
    "CCEEmbeddingBag": "modules",
    "FactorizedEmbedding": "modules",
    "FactorizedLinear": "modules",
    "KPDLinear": "modules",
    "KPDPatternLinear": "modules",
    "KronEmbedding": "modules",
    "KronLinear": "modules",
    "LowRankEmbedding": "modules",
    "LowRankLinear": "modules",
    "TiedFactorizedHead": "modules",
    "TTEmbedding": "modules",
    "TTEmbeddingBag": "modules",
    "Word2KetEmbedding": "modules",
    "ReconstructionReport": "reconstruct",
    "reconstruct": "reconstruct",
    "CompressionReport": "report",
    "report": "report",
    "applied_config": "surgery",
    "compress_model": "surgery",
    "decompress_model": "surgery",
    "untie_lm_head": "surgery",
    "KronTrainingCallback": "training",
    "on_train_step": "training",
}

__all__ = ["__version__", *_SUBMODULES, *_EXPORTS]


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(ModuleType):
    """Keeps ``kt.report`` / ``kt.distill`` the functions when their submodules are imported by path
    (the import system sets ``kron_transformers.<submodule>`` on the package after loading it)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
register_with_transformers()
