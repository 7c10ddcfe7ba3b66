"""Op boundaries of the compressed layers (ARCHITECTURE.md layer 2).

Plain tensor ops with no dependency on the rest of the package: the factorizations call
these functions and nothing lower-level, so a fused kernel can replace each one without
touching the factorizations or modules. Each op has a PyTorch reference (``torch_ops``,
``block_sparse_ops``; every device) and, where written, a fused Triton kernel; ``dispatch``
picks one per call (``KRON_TRANSFORMERS_BACKEND=auto|torch|triton``).
"""

from .dispatch import KERNELS, register_kernel, selected_backend
from .ops import block_sparse_matmul, kpd_matmul, kron_gather_rows, kron_matmul, tt_embedding_bag, tt_gather_rows
from .tensor_train import tt_materialize
from .torch_ops import kron_materialize, kron_vectors_tree, mixed_radix_digits


__all__ = [
    "KERNELS",
    "block_sparse_matmul",
    "kpd_matmul",
    "kron_gather_rows",
    "kron_materialize",
    "kron_matmul",
    "kron_vectors_tree",
    "mixed_radix_digits",
    "register_kernel",
    "selected_backend",
    "tt_embedding_bag",
    "tt_gather_rows",
    "tt_materialize",
]
