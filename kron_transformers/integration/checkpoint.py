"""``kt.from_pretrained``: load a compressed checkpoint with the plugin guaranteed to be active."""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from transformers import AutoConfig

from ..config import QUANT_METHOD, KronConfig


HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, model_class: type | None = None, **kwargs: Any
):
    """Load a kron_transformers checkpoint (local folder or Hub id) as its saved architecture.

    Plain ``AutoModel...from_pretrained`` also works once ``kron_transformers`` is imported; this
    wrapper makes the import implicit and refuses a checkpoint that is not compressed (unless a
    ``quantization_config=kt.KronConfig(...)`` asks to compress it while loading), instead of
    silently loading something else. ``model_class`` defaults to the checkpoint's recorded
    architecture (``config.architectures[0]``).
    """
    config = kwargs.get("config")
    if config is None:
        config = AutoConfig.from_pretrained(
            pretrained_model_name_or_path, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        )
    if recorded_kron_config(config) is None and kwargs.get("quantization_config") is None:
        raise ValueError(
            f"{pretrained_model_name_or_path} is not a kron_transformers checkpoint (its config has no "
            f"quantization_config with quant_method 'kron'); load it with transformers, or pass "
            f"quantization_config=kt.KronConfig(...) to compress it while loading"
        )
    if model_class is None:
        model_class = model_class_for(config)
    return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def recorded_kron_config(config: Any) -> KronConfig | None:
    """The checkpoint's ``KronConfig`` (``config.json``'s ``quantization_config`` with method ``kron``), or None."""
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        return KronConfig.from_dict(quantization) if quantization.get("quant_method") == QUANT_METHOD else None
    return quantization if isinstance(quantization, KronConfig) else None


def model_class_for(config: Any, override: str | None = None) -> type:
    """The transformers class to load a checkpoint as: ``override`` or ``config.architectures[0]``."""
    name = override or next(iter(getattr(config, "architectures", None) or []), None)
    model_class = getattr(transformers, name, None) if name else None
    if model_class is None:
        raise ValueError(
            f"cannot tell which transformers class to load (config.architectures = "
            f"{getattr(config, 'architectures', None)}); pass the class name, e.g. AutoModelForSeq2SeqLM"
        )
    return model_class


def load_structure(pretrained_model_name_or_path: str | os.PathLike, model_class: str | None = None):
    """The compressed model of a checkpoint on the ``meta`` device: structure and counts, no weights read."""
    from ..surgery import mark_compressed, rebuild_structure

    config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
    quantization = recorded_kron_config(config)
    if quantization is None or quantization.modules is None:
        raise ValueError(
            f"{pretrained_model_name_or_path} is not a kron_transformers checkpoint (no 'kron' "
            f"quantization_config with resolved modules in its config.json)"
        )
    del config.quantization_config
    with torch.device("meta"):
        model = model_class_for(config, model_class)(config)
    mark_compressed(model, rebuild_structure(model, quantization))
    return model
