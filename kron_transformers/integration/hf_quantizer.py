"""The transformers quantizer plugin, method ``"kron"`` (REFERENCES.md part 2).

Registering ``KronConfig`` and ``KronHfQuantizer`` lets plain ``from_pretrained`` either rebuild
a compressed checkpoint's exact structure before its weights load (``pre_quantized``: the
config carries resolved ``modules``), or compress a dense checkpoint while it loads
(``from_pretrained(dense, quantization_config=kt.KronConfig(...))``, equal to ``compress_model``;
each targeted tensor is factorized as it is read, see ``streaming``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer

from ..config import QUANT_METHOD, KronConfig
from ..surgery import add_compression_listener, applied_config, decompress_model, rebuild_structure
from .hub import bind_push_to_hub, unbind_push_to_hub
from .safetensors_check import check_finite_factors, check_single_layout, validate_checkpoint_files
from .saving import bind_save_pretrained, unbind_save_pretrained
from .streaming import CompressTensor, StreamingCompression


register_quantization_config(QUANT_METHOD)(KronConfig)

# transformers >= 5.25 kernelizes every model in ``from_pretrained`` (hub kernels, on by default) before the
# quantizer's ``postprocess_model``, on the device of the model's first parameter unless the model names one here
# (as transformers does for offloaded models). While a dense checkpoint streams in, the targeted dense modules are
# ``meta`` shells until ``StreamingCompression.finish``, so the load names the CPU, where it puts the weights
# without a ``device_map``; with one, transformers names the device itself.
KERNELS_DEVICE = "_kernels_device"


@register_quantizer(QUANT_METHOD)
class KronHfQuantizer(HfQuantizer):
    """Rebuilds factorized modules at load time; compresses dense checkpoints on the fly."""

    requires_calibration = False

    def __init__(self, quantization_config: KronConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and quantization_config.modules is None:
            raise ValueError(
                "this checkpoint's quantization_config has quant_method 'kron' but no resolved 'modules'; "
                "it was not written by kron_transformers.compress_model + save_pretrained"
            )
        self.stream: StreamingCompression | None = None
        self.set_kernels_device = False  # whether this load set the model's KERNELS_DEVICE
        self.state_dict_to_save: dict | None = None  # set by saving.save_pretrained for one call

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        checkpoint_files = kwargs.get("checkpoint_files") or []
        check_single_layout(checkpoint_files)
        if self.pre_quantized:
            self.quantization_config = rebuild_structure(model, self.quantization_config)
            validate_checkpoint_files(model, checkpoint_files)
        else:
            self.stream = StreamingCompression(model, self.quantization_config, checkpoint_files)
            if kwargs.get("device_map") is None and getattr(model, KERNELS_DEVICE, None) is None:
                setattr(model, KERNELS_DEVICE, "cpu")
                self.set_kernels_device = True
        return model

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        return self.stream is not None and self.stream.claims(param_name)

    def get_quantize_ops(self) -> CompressTensor:
        return CompressTensor(self.stream)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        if self.pre_quantized:
            check_finite_factors(model)
        else:
            self.stream.finish(model)
            self.stream = None
            if self.set_kernels_device:
                delattr(model, KERNELS_DEVICE)
                self.set_kernels_device = False
            self.quantization_config = applied_config(model)
        bind_push_to_hub(model)
        bind_save_pretrained(model)
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel) -> tuple[dict | None, dict]:
        """The ``state_dict=`` given to ``save_pretrained`` (e.g. an FSDP full state dict), else the model's own.

        transformers replaces a passed state dict by this method's result for quantized models.
        """
        return self.state_dict_to_save, {}

    def _dequantize(self, model: PreTrainedModel, dtype: Any = None) -> PreTrainedModel:
        return decompress_model(model)

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Factors are ordinary trainable Parameters: full fine-tuning is the intended use."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def attach_quantizer(model: nn.Module, config: KronConfig) -> None:
    """Make an in-memory compressed model look like a reloaded one (pitfall 8)."""
    if isinstance(model, PreTrainedModel):
        model.hf_quantizer = KronHfQuantizer(config, pre_quantized=True)
        model.is_quantized = True
        model.quantization_method = QUANT_METHOD
        bind_push_to_hub(model)
        bind_save_pretrained(model)


def detach_quantizer(model: nn.Module) -> None:
    """Undo ``attach_quantizer`` after ``decompress_model``: a plain dense model again."""
    if isinstance(model, PreTrainedModel):
        for attribute in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attribute):
                delattr(model, attribute)
        model.is_quantized = False
        unbind_push_to_hub(model)
        unbind_save_pretrained(model)
        for module in model.modules():
            if isinstance(module, PreTrainedModel) and hasattr(module.config, "_is_quantized"):
                module.config._is_quantized = False


def _sync_quantizer(model: nn.Module, config: KronConfig | None) -> None:
    if config is None:
        detach_quantizer(model)
    else:
        attach_quantizer(model, config)


add_compression_listener(_sync_quantizer)
