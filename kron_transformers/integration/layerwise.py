"""``kt.compress_pretrained``: compress a checkpoint without loading it densely, ``init="calibrated"`` block by block.

``init="svd"`` and ``"random"`` need each dense weight alone, so they compress while loading
(``from_pretrained(..., quantization_config=...)``, ``streaming.py``). ``init="calibrated"`` also needs each
layer's input second moment ``C = E[x x^T]`` (``calibration.py``), i.e. the model run on data. Here it runs
*sequentially*, as GPTQ calibrates (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2023): for every unit ``u`` in the order the model runs them (each transformer block
of ``reconstruct.find_blocks``; each targeted module outside the blocks, such as an embedding or an untied
head),

    X_u  = the inputs of unit u in the model whose units before u are already compressed
    C_l  = (1/T) sum_t x_t x_t^T   over the inputs x_t of each targeted linear l of u, with u dense, on X_u
    W_l  -> argmin over the factorization of ||(W_l - W_hat_l) C_l^(1/2)||_F   (factorizations/weighted.py)

so each layer is fitted to the activations the compressed model will actually give it. An embedding is weighted by
the frequency of the tokens it reads at its first call: an encoder-decoder's shared table sees the encoder's tokens
only (the decoder's come after the encoder blocks, which need the compressed table), where ``compress_model``'s
``kt.calibrate`` counts both. Only unit ``u``'s
tensors are read from the safetensors shards when ``u`` is reached and, once compressed, its dense weights
are dropped: peak memory is about the compressed model, one dense block and the calibration activations of
one block (plus the modules that stay dense, loaded first).

Each calibration batch runs the model's own ``forward`` in a worker thread that parks at every unit's forward
pre-hook; when every batch has reached unit ``u`` the main thread loads ``u``, runs the dense ``u`` on the
parked inputs (arguments and keyword arguments as the model passes them: attention masks, rotary embeddings,
T5's position bias, encoder states), compresses it, swaps the factorized modules in and lets the batches run on
through the compressed ``u``. No assumption is made about what the model passes between blocks, and each
unit's inputs are computed once. The workers run one at a time, so results do not depend on thread timing.

Non-persistent buffers (e.g. rotary ``inv_freq``) are computed when the skeleton is built: parameters are
created on ``meta``, buffers on the CPU (``accelerate.init_empty_weights(include_buffers=False)``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..calibration import CalibrationStats, move_to_device, record_statistics
from ..config import KronConfig
from ..modules import FactorizedEmbedding
from ..reconstruct import _model_kwargs, resolve_blocks
from ..surgery import (
    KIND_EMBEDDING,
    KIND_TIED_HEAD,
    _build,
    _Plan,
    _wrap,
    build_order,
    plan_compression,
    set_module,
    swap_in,
)
from .streaming import release_freed_heap, release_mapped_pages, tie_skeleton


SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def compress_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    config: KronConfig,
    calibration_data: Iterable[Mapping[str, Any]] | None = None,
    *,
    model_class: str | type | None = None,
    dtype: torch.dtype | None = None,
    blocks: list[str] | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Compress a dense checkpoint into a factorized model without ever holding the dense model in memory.

    ``init="svd"`` / ``"random"``: ``model_class.from_pretrained(path, quantization_config=config)``, each
    targeted weight factorized as its tensor is read. ``init="calibrated"``: block by block from the
    safetensors shards (module docstring), calibrated on ``calibration_data`` (a list or DataLoader of
    model-input dicts, iterated once) with every earlier block already compressed. ``model_class``: a
    transformers class or its name (default ``config.architectures[0]``); ``dtype``: the model's dtype (default
    the checkpoint config's ``dtype``, else float32); ``blocks`` overrides the block names of
    ``reconstruct.find_blocks``. A tqdm bar over the compressed modules shows the running compression ratio
    when stderr is a terminal (``progress=`` forces it on or off). Returns the compressed model, which
    ``save_pretrained`` writes and ``from_pretrained`` reloads like any other.

    ```py
    model = kt.compress_pretrained("my-llama", kt.KronConfig(ffn=kt.Shapeshifter(rank=8), init="calibrated"),
                                   calibration_data=batches)
    model.save_pretrained("my-llama-kron", max_shard_size="2GB")
    ```
    """
    from transformers import AutoConfig

    from .checkpoint import model_class_for

    if not isinstance(config, KronConfig):
        raise TypeError(
            f"compress_pretrained: config must be a kron_transformers.KronConfig, got {type(config).__name__}"
        )
    folder = _local_folder(pretrained_model_name_or_path)
    model_config = AutoConfig.from_pretrained(folder)
    cls = model_class if isinstance(model_class, type) else model_class_for(model_config, model_class)
    if config.init != "calibrated":
        if calibration_data is not None:
            raise ValueError(
                f"compress_pretrained: calibration_data is used by init='calibrated' only (the config has "
                f"init={config.init!r}); drop it or set init='calibrated'"
            )
        return cls.from_pretrained(folder, quantization_config=config, dtype=dtype)
    if calibration_data is None:
        raise ValueError(
            "compress_pretrained: init='calibrated' needs calibration_data= (a list or DataLoader of model-input "
            "dicts, e.g. tokenizer outputs)"
        )
    batches = []
    for batch in calibration_data:
        if not isinstance(batch, Mapping):
            raise TypeError(
                "compress_pretrained: each calibration batch must be a dict of model inputs, got "
                f"{type(batch).__name__}"
            )
        batches.append(move_to_device(dict(batch), torch.device("cpu")))
    if not batches:
        raise ValueError("compress_pretrained: calibration_data is empty; give at least one batch of model inputs")
    checkpoint = _Checkpoint(folder)
    model = _skeleton(cls, model_config, dtype, folder)
    LayerwiseCalibration(model, config, checkpoint, batches, blocks, progress).run()
    return model


def _local_folder(location: str | os.PathLike) -> Path:
    """A local checkpoint folder, or the Hub snapshot of ``location`` (config and safetensors files only)."""
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"compress_pretrained: {location} is a file; give the checkpoint's folder")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(location), allow_patterns=["*.json", "*.safetensors"]))


def _skeleton(cls: type, model_config: Any, dtype: torch.dtype | None, folder: Path) -> nn.Module:
    """The model with parameters on ``meta`` and buffers computed on the CPU, tied as after loading."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    if dtype is None:
        dtype = getattr(model_config, "dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(model_config, dtype=dtype)
    tie_skeleton(model)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


class _Checkpoint:
    """The safetensors files of a checkpoint folder: which file holds each tensor; reads only named tensors."""

    def __init__(self, folder: Path) -> None:
        index, single = folder / SAFE_INDEX, folder / SAFE_SINGLE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: str(folder / file) for key, file in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), str(single))
        else:
            raise ValueError(
                f"compress_pretrained: {folder} has neither {SAFE_INDEX} nor {SAFE_SINGLE}; layer-by-layer "
                f"calibration reads safetensors checkpoints (re-save the model with save_pretrained)"
            )
        self.read: list[str] = []  # every key read, in order

    def key(self, name: str, prefix: str) -> str | None:
        """The checkpoint key of the model's tensor ``name`` (with or without the base model prefix)."""
        for candidate in (name, f"{prefix}.{name}" if prefix else None):
            if candidate in self.files:
                return candidate
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in self.files:
            return name[len(prefix) + 1 :]
        return None

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys``, each file opened once and closed (unmapped) before returning."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        tensors = {}
        for file, file_keys in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for key in file_keys:
                    tensors[key] = handle.get_tensor(key)
                    self.read.append(key)
        return tensors


@dataclass
class _Unit:
    """A block, or a targeted module outside the blocks: loaded, calibrated and compressed together."""

    name: str
    modules: list[nn.Module]  # forward pre-hooks go here (a block; or the module and its aliases)
    prefixes: list[str]  # parameters under these module paths load with the unit
    plans: list[_Plan] = field(default_factory=list)
    done: bool = False
    replaced: dict[int, nn.Module] = field(default_factory=dict)  # id(a hooked module) -> its replacement


class _StopForward(Exception):
    """Raised in a worker once every unit is compressed: nothing after needs to run."""


class LayerwiseCalibration:
    """One ``compress_pretrained(init="calibrated")`` run over a ``meta`` skeleton (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        config: KronConfig,
        checkpoint: _Checkpoint,
        batches: list[dict[str, Any]],
        blocks: list[str] | None = None,
        progress: bool | None = None,
    ) -> None:
        self.model, self.config, self.checkpoint, self.batches = model, config, checkpoint, batches
        self.order = build_order(plan_compression(model, config))
        if not self.order:
            raise ValueError(
                f"compress_pretrained: no module of {type(model).__name__} matches the config; nothing to compress"
            )
        names = resolve_blocks(model, blocks, "compress_pretrained")
        self.units = [_Unit(name, [model.get_submodule(name)], [name]) for name in names]
        for plan in self.order:
            if plan.kind == KIND_TIED_HEAD:
                continue  # built with its embedding
            block = next((u for u in self.units[: len(names)] if plan.info.name.startswith(u.name + ".")), None)
            if block is not None:
                block.plans.append(plan)
                continue
            infos = plan.group if plan.kind == KIND_EMBEDDING else [plan.info]
            self.units.append(
                _Unit(plan.info.name, [info.module for info in infos], [n for i in infos for n in i.names], [plan])
            )
        self.built_embeddings: dict[int, FactorizedEmbedding] = {}
        self.owners = self._parameter_owners()
        self.dense_parameters = self.compressed_parameters = 0
        show = sys.stderr.isatty() if progress is None else progress
        self.progress = tqdm(
            total=sum(len(u.plans) for u in self.units), desc="kron: calibrating", unit="module", disable=not show
        )

    def _parameter_owners(self) -> dict[int, tuple[list[str], list[tuple[nn.Module, str]]]]:
        """id(parameter) -> (its names, every (module, attribute) holding it): tied parameters load once."""
        owners: dict[int, tuple[list[str], list[tuple[nn.Module, str]]]] = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            module_path, _, attribute = name.rpartition(".")
            module = self.model.get_submodule(module_path) if module_path else self.model
            names, holders = owners.setdefault(id(parameter), ([], []))
            names.append(name)
            holders.append((module, attribute))
        return owners

    def _unit_parameters(self, unit: _Unit | None) -> list[int]:
        """ids of the still-``meta`` parameters ``unit`` loads (None: those under no unit)."""

        def under(name: str, prefixes: list[str]) -> bool:
            return any(name == p or name.startswith(p + ".") for p in prefixes)

        every = [p for u in self.units for p in u.prefixes]
        chosen = []
        for key, (names, holders) in self.owners.items():
            parameter = getattr(holders[0][0], holders[0][1])
            if not parameter.is_meta:
                continue
            if unit is None and not any(under(n, every) for n in names):
                chosen.append(key)
            elif unit is not None and any(under(n, unit.prefixes) for n in names):
                chosen.append(key)
        return chosen

    @torch.no_grad()
    def _load(self, parameter_ids: list[int]) -> None:
        """Read these parameters' tensors from the checkpoint and set them on every module holding them."""
        prefix = getattr(self.model, "base_model_prefix", "")
        keys: dict[int, str] = {}
        for key in parameter_ids:
            names = self.owners[key][0]
            found = next((k for k in (self.checkpoint.key(n, prefix) for n in names) if k is not None), None)
            if found is None:
                raise ValueError(
                    f"compress_pretrained: the checkpoint lacks {names[0]} (shape "
                    f"{tuple(getattr(self.owners[key][1][0][0], self.owners[key][1][0][1]).shape)}); the model "
                    f"was not compressed"
                )
            keys[key] = found
        tensors = self.checkpoint.load(list(keys.values()))
        for key, checkpoint_key in keys.items():
            names, holders = self.owners[key]
            skeleton = getattr(holders[0][0], holders[0][1])
            tensor = tensors.pop(checkpoint_key)
            if tuple(tensor.shape) != tuple(skeleton.shape):
                raise ValueError(
                    f"compress_pretrained: {checkpoint_key} has shape {tuple(tensor.shape)} in the checkpoint, "
                    f"{names[0]} expects {tuple(skeleton.shape)}"
                )
            parameter = nn.Parameter(tensor.to(skeleton.dtype), requires_grad=skeleton.requires_grad)
            for module, attribute in holders:
                setattr(module, attribute, parameter)
            self.owners[id(parameter)] = self.owners.pop(key)
        release_mapped_pages(sorted(set(self.checkpoint.files.values())))

    def _free(self, plans: list[_Plan]) -> None:
        """Put the replaced dense modules' weights (and biases) back on ``meta``: the dense tensors are dropped.

        A module that still holds one of them (a head ``untie_lm_head`` untied from the embedding) keeps it.
        """
        infos = [info for plan in plans for info in (plan.group if plan.kind == KIND_EMBEDDING else [plan.info])]
        replaced = {id(info.module) for info in infos}
        for info in infos:
            for attribute in ("weight", "bias"):
                parameter = getattr(info.module, attribute, None)
                if isinstance(parameter, nn.Parameter) and not parameter.is_meta:
                    names, holders = self.owners.pop(id(parameter))
                    shell = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)
                    freed = [id(module) in replaced for module, _ in holders]
                    for (module, name), free in zip(holders, freed):
                        if free:
                            setattr(module, name, shell)
                    self.owners[id(shell)] = _split_owners(names, holders, freed, True)
                    if not all(freed):
                        self.owners[id(parameter)] = _split_owners(names, holders, freed, False)

    @torch.no_grad()
    def _compress(self, unit: _Unit, inputs: list[tuple[tuple, dict]]) -> None:
        """Load ``unit``, collect ``C`` of its targeted layers on ``inputs`` (dense), compress, drop the dense."""
        self._load(self._unit_parameters(unit))
        stats = CalibrationStats()
        handles = []
        for plan in unit.plans:
            infos = plan.group if plan.kind == KIND_EMBEDDING else [plan.info]
            handles += record_statistics([(plan.info.name, info.module) for info in infos], stats)
        try:
            for args, kwargs in inputs:
                unit.modules[0](*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for plan in unit.plans:
            _build(
                plan,
                self.config.init,
                self.built_embeddings,
                stats,
                release_statistics=True,
                time_ratio=self.config.calibration_time_ratio,
            )
            self.dense_parameters += plan.rows * plan.cols
            self.compressed_parameters += sum(p.numel() for p in plan.replacements[0].factorization.parameters())
            built = [plan]
            for tied in self.order:  # a head tied to this embedding shares its factors
                if tied.kind == KIND_TIED_HEAD and tied.info.module.weight is plan.info.module.weight:
                    _wrap(tied, None, self.built_embeddings)
                    built.append(tied)
            for done in built:
                infos = done.group if done.kind == KIND_EMBEDDING else [done.info]
                for info, replacement in zip(infos, done.replacements):
                    for path in info.names:
                        set_module(self.model, path, replacement)
                    unit.replaced[id(info.module)] = replacement
            self._free(built)
            self.progress.set_postfix(ratio=f"{self.dense_parameters / max(self.compressed_parameters, 1):.1f}x")
            self.progress.update()
        unit.done = True
        release_freed_heap()

    @torch.no_grad()
    def _load_buffers(self) -> None:
        """Persistent buffers the checkpoint holds replace those computed when the skeleton was built."""
        prefix = getattr(self.model, "base_model_prefix", "")
        persistent = set(self.model.state_dict(keep_vars=True))
        keys = {
            name: key
            for name, _ in self.model.named_buffers()
            if name in persistent and (key := self.checkpoint.key(name, prefix)) is not None
        }
        tensors = self.checkpoint.load(list(dict.fromkeys(keys.values())))
        for name, key in keys.items():
            module_path, _, attribute = name.rpartition(".")
            module = self.model.get_submodule(module_path) if module_path else self.model
            current = getattr(module, attribute)
            module.register_buffer(attribute, tensors[key].to(current.dtype), persistent=True)

    def run(self) -> None:
        """Load what stays dense, run the batches through the units one unit at a time, record the config."""
        try:
            self._load_buffers()
            self._load(self._unit_parameters(None))
            workers = _Workers(self.model, self.batches, self.units)
            try:
                while True:
                    unit, inputs = workers.next_unit()
                    if unit is None:
                        break
                    self._compress(unit, inputs)
                    workers.release(stop=all(u.done for u in self.units))
            finally:
                workers.close()
            for unit in self.units:  # never reached by the calibration data: loaded, then svd (recorded as such)
                if not unit.done:
                    self._compress(unit, [])
        finally:
            self.progress.close()
        left = [names[0] for names, holders in self.owners.values() if getattr(holders[0][0], holders[0][1]).is_meta]
        replaced = {n for plan in self.order for info in (plan.group or [plan.info]) for n in info.names}
        left = [name for name in left if name.rpartition(".")[0] not in replaced]
        if left:
            raise ValueError(f"compress_pretrained: the checkpoint lacks {len(left)} tensor(s), e.g. {left[:3]}")
        swap_in(self.model, self.config, self.order)


def _split_owners(
    names: list[str], holders: list[tuple[nn.Module, str]], freed: list[bool], side: bool
) -> tuple[list[str], list[tuple[nn.Module, str]]]:
    """The names and holders of one parameter whose ``freed`` flag is ``side``."""
    chosen = [index for index, flag in enumerate(freed) if flag == side]
    return [names[index] for index in chosen], [holders[index] for index in chosen]


class _Workers:
    """One thread per calibration batch running ``model(**batch)``, parked at each unit's forward pre-hook."""

    def __init__(self, model: nn.Module, batches: list[dict[str, Any]], units: list[_Unit]) -> None:
        self.condition = threading.Condition()
        self.compute = threading.Lock()  # one worker computes at a time
        self.local = threading.local()
        self.parked: dict[int, tuple[_Unit, tuple, dict]] = {}
        self.finished: set[int] = set()
        self.errors: dict[int, BaseException] = {}
        self.stop = False
        self.count = len(batches)
        self.handles = []
        for unit in units:
            for module in unit.modules:
                self.handles.append(module.register_forward_pre_hook(self._hook(unit), with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._redirect(unit), with_kwargs=True))
        extra = _model_kwargs(model)
        self.threads = [
            threading.Thread(target=self._work, args=(index, model, batch, extra), daemon=True)
            for index, batch in enumerate(batches)
        ]
        for thread in self.threads:
            thread.start()

    def _hook(self, unit: _Unit):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            index = getattr(self.local, "index", None)
            if index is None or unit.done:  # the main thread calibrating, or a unit already compressed
                return None
            self.compute.release()
            with self.condition:
                self.parked[index] = (unit, args, kwargs)
                self.condition.notify_all()
                self.condition.wait_for(lambda: index not in self.parked)
                stop = self.stop
            self.compute.acquire()
            if stop:
                raise _StopForward
            return None

        return hook

    def _redirect(self, unit: _Unit):
        """A module compressed while a worker was calling it ran on its ``meta`` shell: the replacement's output."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if getattr(self.local, "index", None) is None or id(module) not in unit.replaced:
                return None
            return unit.replaced[id(module)](*args, **kwargs)

        return hook

    def _work(self, index: int, model: nn.Module, batch: dict[str, Any], extra: dict) -> None:
        self.local.index = index
        self.compute.acquire()
        try:
            with torch.no_grad():
                model(**batch, **extra)
        except _StopForward:
            pass
        except BaseException as error:  # handed to the main thread, which raises it
            self.errors[index] = error
        finally:
            self.compute.release()
            with self.condition:
                self.finished.add(index)
                self.condition.notify_all()

    def next_unit(self) -> tuple[_Unit | None, list[tuple[tuple, dict]]]:
        """Wait until every batch is parked or done; the unit they are parked at and their inputs, in batch order."""
        with self.condition:
            self.condition.wait_for(lambda: len(self.parked) + len(self.finished) == self.count)
            if self.errors:
                raise next(iter(self.errors.values()))
            if not self.parked:
                return None, []
            units = {id(unit): unit for unit, _, _ in self.parked.values()}
            if len(units) > 1 or self.finished:
                where = sorted({unit.name for unit, _, _ in self.parked.values()})
                raise ValueError(
                    f"compress_pretrained: the calibration batches took different paths through the model "
                    f"(waiting at {where}, {len(self.finished)} finished); give batches of the same kind of inputs"
                )
            unit = next(iter(units.values()))
            return unit, [(args, kwargs) for _, (_, args, kwargs) in sorted(self.parked.items())]

    def release(self, stop: bool = False) -> None:
        with self.condition:
            self.stop = stop
            self.parked.clear()
            self.condition.notify_all()

    def close(self) -> None:
        """Stop every parked worker, wait for all, remove the hooks."""
        self.release(stop=True)
        for thread in self.threads:
            thread.join()
        for handle in self.handles:
            handle.remove()
