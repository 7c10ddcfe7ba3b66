"""``save_pretrained`` for compressed models: staged, then moved into place, stale weight files removed.

transformers writes into the target folder directly and only deletes stale shards of the layout it
is writing, so (a) a save that fails halfway leaves a broken checkpoint, and (b) an older
``model.safetensors`` next to a new sharded save (or an old index next to a new single file) stays
and is loaded instead, or alongside. Here the checkpoint is written into a staging folder inside
the target first; only when that succeeded are its files moved in (``os.replace``, atomic per file)
and every weight file the new save does not contain deleted: the other layout and stale shards.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from torch import nn


STAGING_PREFIX = ".kron-save-"
WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """transformers' ``save_pretrained`` (same keywords), made safe for existing checkpoints in the folder."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "state_dict_to_save"):
        quantizer.state_dict_to_save = kwargs.get("state_dict")
    try:
        _save_staged(model, save_directory, **kwargs)
    finally:
        if quantizer is not None and hasattr(quantizer, "state_dict_to_save"):
            quantizer.state_dict_to_save = None


def _save_staged(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    save = functools.partial(type(model).save_pretrained, model)
    if not kwargs.get("is_main_process", True) or kwargs.get("variant") or kwargs.get("push_to_hub"):
        return save(save_directory, **kwargs)  # other ranks write nothing; variants and pushes keep their own naming
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=STAGING_PREFIX) as staging:
        save(staging, **kwargs)
        written = set(os.listdir(staging))
        for name in sorted(written, key=lambda n: n.endswith(".index.json")):  # the index last: shards exist first
            os.replace(os.path.join(staging, name), folder / name)
    for stale in os.listdir(folder):
        if stale not in written and WEIGHT_FILE.fullmatch(stale) and (folder / stale).is_file():
            (folder / stale).unlink()


def bind_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained(...)`` the safe version (instance attribute, undone by unbinding)."""
    model.save_pretrained = functools.partial(save_pretrained, model)


def unbind_save_pretrained(model: nn.Module) -> None:
    if "save_pretrained" in model.__dict__:
        del model.__dict__["save_pretrained"]
