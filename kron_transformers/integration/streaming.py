"""Compress while loading: each targeted dense weight is factorized as its tensor is read, then freed.

``from_pretrained(dense, quantization_config=kt.KronConfig(...))`` builds the model on the ``meta``
device, and transformers' loader hands every checkpoint tensor the quantizer claims
(``param_needs_quantization``) to the conversion op ``get_quantize_ops`` returns, one tensor at a
time. ``CompressTensor`` turns the dense tensor into its factorization there and keeps only the
factors; the dense module stays an empty ``meta`` shell until ``StreamingCompression.finish``
swaps all replacements in at once, exactly as ``compress_model`` does. Peak memory is about the
compressed model plus the largest dense tensor being factorized (and the loader's own buffers).

``init="svd"`` factorizes on arrival (no global random numbers are drawn, so the arrival order does
not matter). ``init="random"`` needs only each weight's standard deviation: it is taken on arrival
and the factors are drawn in ``compress_model``'s order once loading is done, so the same seed gives
the same factors. ``init="calibrated"`` is refused: calibration runs the model on data, which
``from_pretrained`` does not receive (load densely and call ``compress_model(..., calibration_data=)``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.core_model_loading import ConversionOps

from ..config import KronConfig
from ..factorizations import build_factorization
from ..modules import FactorizedEmbedding
from ..roles import is_conv1d
from ..surgery import (
    KIND_EMBEDDING,
    KIND_TIED_HEAD,
    _factorize,
    _Plan,
    _wrap,
    build_order,
    plan_compression,
    swap_in,
)


class StreamingCompression:
    """One compress-while-loading run: the resolved plans, and the factorizations built so far."""

    def __init__(self, model: nn.Module, config: KronConfig, checkpoint_files: list[str] | None = None) -> None:
        if config.init == "calibrated":
            raise ValueError(
                "from_pretrained(..., quantization_config=KronConfig(init='calibrated')): calibration runs the model "
                "on data, which from_pretrained does not receive; load the dense model and call "
                "kt.compress_model(model, config, calibration_data=...), or use init='svd' to compress while loading"
            )
        tie_skeleton(model)
        self.config = config
        self.order = build_order(plan_compression(model, config))
        self.checkpoint_files = [str(file) for file in checkpoint_files or []]
        self.plans: dict[str, _Plan] = {}  # dense parameter name -> the plan that consumes it
        for plan in self.order:
            infos = plan.group if plan.kind == KIND_EMBEDDING else [plan.info]
            for info in infos:
                for name in info.names:
                    self.plans[f"{name}.weight"] = plan
        self.head, self.head_weight_name, self.head_source = self._untied_head(model)
        self.head_weight: torch.Tensor | None = None  # the untied head's dense tensor, set on it by finish
        self.factorizations: dict[int, nn.Module] = {}  # id(plan) -> built factorization
        self.standard_deviations: dict[int, float] = {}  # id(plan) -> dense std, for init="random"
        self.dense_parameters = 0
        self.compressed_parameters = 0
        self.progress = tqdm(
            total=sum(plan.kind != KIND_TIED_HEAD for plan in self.order),
            desc="kron: compressing",
            unit="module",
            disable=not sys.stderr.isatty(),
        )

    def _untied_head(self, model: nn.Module) -> tuple[nn.Module | None, str | None, _Plan | None]:
        """The output head ``untie_lm_head`` unties from the input embedding, its weight's name, and the
        embedding's plan (None: the embedding stays dense).

        The checkpoint holds one tensor for both (the head's key is left out as tied), so the head takes
        its weight, or its own factorization, from the embedding's tensor.
        """
        if not self.config.untie_lm_head:
            return None, None, None
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if head is None or embedding is None or getattr(head, "weight", None) is not embedding.weight:
            return None, None, None
        head_name = next(name for name, module in model.named_modules() if module is head)
        source = next((plan for plan in self.order if plan.info.module is embedding), None)
        return head, f"{head_name}.weight", source

    def claims(self, parameter_name: str) -> bool:
        return parameter_name in self.plans

    @torch.no_grad()
    def consume(self, parameter_name: str, tensor: torch.Tensor) -> None:
        """Factorize (or, for ``init="random"``, measure) one dense tensor; nothing of it is kept."""
        plan = self.plans[parameter_name]
        if self.head is not None and plan is self.head_source:
            self._feed_untied_head(tensor)
        if plan.kind == KIND_TIED_HEAD or id(plan) in self.factorizations or id(plan) in self.standard_deviations:
            return  # a tied copy of a weight already consumed
        skeleton = plan.info.module.weight
        tensor = tensor.to(skeleton.dtype)
        weight = tensor.T if is_conv1d(plan.info.module) else tensor
        if tuple(weight.shape) != (plan.rows, plan.cols):
            raise ValueError(
                f"{parameter_name}: the checkpoint's tensor has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(skeleton.shape)}"
            )
        self.dense_parameters += weight.numel()
        if self.config.init == "random":
            self.standard_deviations[id(plan)] = float(weight.detach().float().std())
        else:
            self._store(plan, _factorize(plan, weight, self.config.init, None, skeleton.requires_grad))
        release_mapped_pages(self.checkpoint_files)
        release_freed_heap()

    def _feed_untied_head(self, tensor: torch.Tensor) -> None:
        """Give the untied head the embedding's dense tensor: factorized by its own plan, or kept for ``finish``."""
        if self.head_weight_name in self.plans:
            self.consume(self.head_weight_name, tensor)
        elif self.head_weight is None:
            self.head_weight = tensor.to(self.head.weight.dtype, copy=True)

    def _store(self, plan: _Plan, factorization: nn.Module) -> None:
        self.factorizations[id(plan)] = factorization
        self.compressed_parameters += sum(p.numel() for p in factorization.parameters())
        self.progress.set_postfix(ratio=f"{self.dense_parameters / max(self.compressed_parameters, 1):.1f}x")
        self.progress.update()

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """Draw the random inits in ``compress_model``'s order, wrap every factorization, swap all in."""
        head_plan = self.plans.get(self.head_weight_name)
        if head_plan is not None and self.head_source is None:  # the dense embedding loaded the head's tensor
            self.consume(self.head_weight_name, self.head.weight)
        missing = [
            f"{plan.info.name}.weight"
            for plan in self.order
            if plan.kind != KIND_TIED_HEAD
            and id(plan) not in self.factorizations
            and id(plan) not in self.standard_deviations
        ]
        if missing:
            raise ValueError(
                f"compress-while-loading: the checkpoint lacks {len(missing)} weight(s) the KronConfig targets, "
                f"e.g. {missing[:3]}; the model was not compressed"
            )
        built_embeddings: dict[int, FactorizedEmbedding] = {}
        for plan in self.order:
            if plan.kind == KIND_TIED_HEAD:
                _wrap(plan, None, built_embeddings)
                continue
            if id(plan) in self.standard_deviations:
                self._store(plan, self._random_factorization(plan))
            _wrap(plan, self.factorizations.pop(id(plan)), built_embeddings)
        self.progress.close()
        if self.head_weight is not None:
            self.head.weight = nn.Parameter(self.head_weight, requires_grad=self.head.weight.requires_grad)
        swap_in(model, self.config, self.order)

    def _random_factorization(self, plan: _Plan) -> nn.Module:
        """``compress_model``'s ``init="random"``: factors scaled to the dense weight's standard deviation."""
        skeleton = plan.info.module.weight
        factorization = build_factorization(plan.structure, plan.rows, plan.cols).to(dtype=skeleton.dtype)
        factorization.reset_random(self.standard_deviations.pop(id(plan)))
        plan.init_used = "random"
        return factorization.requires_grad_(skeleton.requires_grad)


def tie_skeleton(model: nn.Module) -> None:
    """Tie the ``meta`` skeleton's weights as ``tie_weights`` will after loading (off while the skeleton is built).

    The roles, and so the plan, depend on the ties: a tied head shares the embedding's factors.
    """
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        module_path, _, attribute = target.rpartition(".")
        setattr(model.get_submodule(module_path) if module_path else model, attribute, model.get_parameter(source))


class CompressTensor(ConversionOps):
    """transformers' per-parameter quantize op: hands the loaded dense tensor to ``StreamingCompression``."""

    def __init__(self, stream: StreamingCompression) -> None:
        self.stream = stream

    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str] | None = None,
        target_patterns: list[str] | None = None,
        full_layer_name: str | None = None,
        model: nn.Module | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        for tensors in input_dict.values():
            for tensor in tensors if isinstance(tensors, list) else [tensors]:
                self.stream.consume(full_layer_name, tensor)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        if model is not None:
            model.get_parameter(full_layer_name)._is_hf_initialized = True  # the meta shell needs no init
        return {}


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only


def release_freed_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Each dense tensor and its float copies are freed after factorizing, but glibc keeps freed heap
    chunks that sit below live ones (the factors, Python objects allocated meanwhile) mapped: on a
    24-layer, 1024-wide Llama (init="random") the resident set grew by 250 MB over the load without
    this call and by 12 MB with it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_mapped_pages(files: list[str]) -> None:
    """Drop this process's resident pages of the memory-mapped checkpoint files (Linux; a no-op elsewhere).

    transformers keeps every shard memory-mapped until loading ends; pages it has read stay in this
    process's resident set although they are clean file pages. ``madvise(MADV_DONTNEED)`` unmaps them
    from the resident set (a later read faults them in again from the page cache), so the resident
    set stays near the compressed model plus the tensor being factorized.
    """
    if not files or not os.path.exists("/proc/self/maps"):
        return
    wanted = {os.path.realpath(file) for file in files}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() in wanted:
                start, end = (int(value, 16) for value in fields[0].split("-"))
                _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
