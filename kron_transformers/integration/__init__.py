"""transformers integration: the ``"kron"`` quantizer plugin and checkpoint helpers (ARCHITECTURE.md layer 6)."""

from .checkpoint import from_pretrained
from .hf_quantizer import KronHfQuantizer
from .hub import push_to_hub
from .layerwise import compress_pretrained
from .model_card import render_model_card, write_model_card


__all__ = [
    "KronHfQuantizer",
    "compress_pretrained",
    "from_pretrained",
    "push_to_hub",
    "render_model_card",
    "write_model_card",
]
