"""Models from a Hub id / folder or from a config alone (``--model_config``, no download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoConfig, PretrainedConfig

from .arguments import ModelArguments
from .errors import RecipeError


def build_config(model_args: ModelArguments, default_config: dict[str, Any], **settings) -> PretrainedConfig:
    """The config of ``--model_name_or_path``, else of ``--model_config`` (a model type with its library defaults,
    or a config file), else the recipe's small ``default_config``; then ``settings`` and ``--config_overrides``."""
    try:
        if model_args.model_name_or_path:
            config = AutoConfig.from_pretrained(model_args.model_name_or_path)
        elif model_args.model_config is None:
            config = AutoConfig.for_model(**default_config)
        elif Path(model_args.model_config).suffix in (".json", ".yaml", ".yml"):
            config = AutoConfig.for_model(**_read_config_file(Path(model_args.model_config)))
        else:
            config = AutoConfig.for_model(model_args.model_config)
        for key, item in settings.items():
            setattr(config, key, item)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
    except (OSError, ValueError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"model config: {message}") from None
    return config


def _read_config_file(path: Path) -> dict:
    try:
        text = path.read_text("utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"--model_config {path}: {error}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise RecipeError(f"--model_config {path}: expected a mapping with a 'model_type' key (a config.json)")
    return data
