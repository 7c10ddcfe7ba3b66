"""``kt.from_pretrained``: load a compressed checkpoint with the plugin guaranteed to be active."""

from __future__ import annotations

import os
from typing import Any

import transformers
from transformers import AutoConfig

from ..config import QUANT_METHOD


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
    quantization = getattr(config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    if method != QUANT_METHOD and kwargs.get("quantization_config") is None:
        raise ValueError(
            f"{pretrained_model_name_or_path} is not a kron_transformers checkpoint (its config has no "
            f"quantization_config with quant_method 'kron'); load it with transformers, or pass "
            f"quantization_config=kt.KronConfig(...) to compress it while loading"
        )
    if model_class is None:
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        if model_class is None:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json names no transformers architecture "
                f"({architectures}); pass model_class=, e.g. transformers.AutoModelForSeq2SeqLM"
            )
    return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
