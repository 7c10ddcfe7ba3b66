"""Checkpoint validation before a compressed model's weights load.

A kron checkpoint is safetensors only (nothing is unpickled), complete, and its factor
tensors have exactly the shapes recorded in its config. Each check raises a ``ValueError``
naming the file and tensor, before transformers copies a single weight, so a bad checkpoint
never yields a half-loaded model.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..modules import COMPRESSED_MODULES


SINGLE_FILE = SAFE_WEIGHTS_NAME  # model.safetensors
SHARD_INDEX = SAFE_WEIGHTS_INDEX_NAME  # model.safetensors.index.json


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor table of a safetensors file, checked against the file's size (no tensor data read)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            raise ValueError(f"{path}: truncated safetensors header ({header_size} bytes declared, file has {size})")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError as error:
            raise ValueError(f"{path}: unreadable safetensors header ({error})") from None
    data_size = size - 8 - header_size
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in tensors.items():
        end = info["data_offsets"][1]
        if end > data_size:
            raise ValueError(
                f"{path}: tensor {name!r} is truncated: it needs bytes up to {end} of the data section, "
                f"which has {data_size}; the file is incomplete, download or save it again"
            )
    return tensors


def _compressed_parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters of compressed modules that a checkpoint must store (tie targets excluded)."""
    tied_targets = set(getattr(model, "all_tied_weights_keys", {}) or {})
    shapes = {}
    for module_name, module in model.named_modules():
        if isinstance(module, COMPRESSED_MODULES):
            for parameter_name, parameter in module.named_parameters(prefix=module_name):
                if parameter_name not in tied_targets:
                    shapes[parameter_name] = tuple(parameter.shape)
    return shapes


def _key_mapper(model: nn.Module):
    """Checkpoint key -> model parameter name, with transformers' own renamings and prefix handling.

    transformers 5 renames legacy checkpoint keys while loading (e.g. ViT's ``attention.attention.key``
    is the module ``attention.k_proj``) and adds or strips ``base_model_prefix``; the same function
    it uses is applied here so the check sees the names the loader will use.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state_dict = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None)

    def model_key(tensor_name: str) -> str:
        return rename_source_key(tensor_name, renamings, converters, prefix, meta_state_dict)[0]

    return model_key


def validate_checkpoint_files(model: nn.Module, checkpoint_files: list[str]) -> None:
    """Safetensors only, not truncated, every factor present with its recorded shape."""
    expected = _compressed_parameter_shapes(model)
    model_key = _key_mapper(model)
    found: set[str] = set()
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise ValueError(
                f"{file}: kron_transformers loads compressed checkpoints from safetensors only (nothing is "
                f"unpickled); save the model again with save_pretrained"
            )
        for tensor_name, info in read_safetensors_header(file).items():
            key = model_key(tensor_name)
            if key in expected:
                found.add(key)
                if tuple(info["shape"]) != expected[key]:
                    raise ValueError(
                        f"{file}: tensor {tensor_name!r} has shape {tuple(info['shape'])} but the compression "
                        f"recorded in config.json needs {expected[key]}; the checkpoint and its config disagree"
                    )
    missing = sorted(set(expected) - found)
    if checkpoint_files and missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} compressed tensor(s) recorded in config.json, e.g. {missing[:3]}; "
            f"it is incomplete or belongs to another compression"
        )


def check_single_layout(checkpoint_files: list[str]) -> None:
    """Refuse a folder holding both a single ``model.safetensors`` and a sharded index (a stale older save).

    transformers would load whichever layout it looks for first, silently ignoring the other.
    """
    folders = {Path(file).parent for file in checkpoint_files}
    for folder in folders:
        single, index = folder / SINGLE_FILE, folder / SHARD_INDEX
        if single.is_file() and index.is_file():
            raise ValueError(
                f"{folder} holds both {SINGLE_FILE} and {SHARD_INDEX} (a single-file and a sharded checkpoint); "
                f"one is stale. Delete the older one, or save the model again with kron_transformers "
                f"(its save_pretrained removes the other layout)"
            )


@torch.no_grad()
def check_finite_factors(model: nn.Module) -> None:
    """Raise naming the first factor tensor holding NaN or infinity (corrupted bytes load silently otherwise)."""
    for module_name, module in model.named_modules():
        if isinstance(module, COMPRESSED_MODULES):
            for name, parameter in module.named_parameters(prefix=module_name, recurse=True):
                if parameter.is_meta or not parameter.is_floating_point():
                    continue
                if not bool(torch.isfinite(parameter).all()):
                    count = int((~torch.isfinite(parameter)).sum())
                    raise ValueError(
                        f"tensor {name!r} of the loaded checkpoint holds {count} non-finite value(s) (NaN or inf); "
                        f"the weights file is corrupted or was saved from a diverged model"
                    )
