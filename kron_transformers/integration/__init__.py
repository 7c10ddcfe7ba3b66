"""transformers integration: the ``"kron"`` quantizer plugin and checkpoint helpers (DESIGN.md layer 6)."""

from .checkpoint import from_pretrained
from .hf_quantizer import KronHfQuantizer


__all__ = ["KronHfQuantizer", "from_pretrained"]
