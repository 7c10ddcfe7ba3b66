"""``--compression PRESET|file``: the papers' setups in ``recipes/configs/*.yaml`` or any KronConfig file.

A preset file holds ``compression:`` (``KronConfig.to_dict()`` fields, or ``null`` for a dense baseline) and
``defaults:`` (recipe argument defaults such as the model config, optimizer and learning rate; the command line
still overrides them). A file without a ``compression:`` key is read as KronConfig fields alone, like the
``kron-transformers compress --config`` file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import kron_transformers as kt

from .errors import RecipeError


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DENSE = "none"


@dataclass
class Preset:
    """A resolved ``--compression`` value."""

    name: str
    compression: kt.KronConfig | None
    defaults: dict[str, Any] = field(default_factory=dict)


def available_presets() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def _read(path: Path) -> Any:
    try:
        text = path.read_text("utf-8")
    except OSError as error:
        raise RecipeError(f"--compression: cannot read {path}: {error.strerror or error}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise RecipeError(f"--compression: {path} is not valid {path.suffix.lstrip('.')}: {error}") from None


def load_preset(value: str | None) -> Preset:
    """``None`` or ``"none"``: dense; a preset name from ``recipes/configs``; or a ``.yaml``/``.yml``/``.json``."""
    if value is None or value == DENSE:
        return Preset(DENSE, None)
    path = Path(value)
    if path.suffix not in (".yaml", ".yml", ".json"):
        if value not in available_presets():
            raise RecipeError(
                f"--compression: unknown preset {value!r}; available presets: {', '.join(available_presets())}, "
                f"'{DENSE}', or a .yaml/.json file"
            )
        path = CONFIG_DIR / f"{value}.yaml"
    elif not path.is_file():
        raise RecipeError(f"--compression: file {value} does not exist")
    data = _read(path)
    if not isinstance(data, dict):
        raise RecipeError(f"--compression: {path} must hold a mapping, got {type(data).__name__}")
    if "compression" in data:
        unknown = sorted(set(data) - {"compression", "defaults"})
        if unknown:
            raise RecipeError(
                f"--compression: {path} has unknown top-level keys {unknown}; use compression: and defaults:"
            )
        compression, defaults = data["compression"], data.get("defaults") or {}
    else:
        compression, defaults = data, {}
    try:
        config = kt.KronConfig.from_dict(compression) if compression is not None else None
    except (TypeError, ValueError) as error:
        raise RecipeError(f"--compression: {path}: {error}") from None
    if not isinstance(defaults, dict):
        raise RecipeError(f"--compression: defaults: in {path} must be a mapping of recipe arguments")
    return Preset(path.stem, config, dict(defaults))


def apply_compression(model, preset: Preset, init: str | None, untie_lm_head: bool):
    """``kt.compress_model`` with the preset's config (``init`` overriding its own); a dense preset passes through.

    ``untie_lm_head``: then ``kt.untie_lm_head`` (a compressed checkpoint's tied head gets its own dense weight).
    """
    if preset.compression is not None:
        config = kt.KronConfig.from_dict(preset.compression.to_dict(), **({"init": init} if init else {}))
        try:
            model = kt.compress_model(model, config)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"--compression {preset.name}: {error}") from None
    if untie_lm_head:
        try:
            kt.untie_lm_head(model)
        except ValueError as error:
            raise RecipeError(f"--untie_lm_head: {str(error).removeprefix('untie_lm_head: ')}") from None
    return model
