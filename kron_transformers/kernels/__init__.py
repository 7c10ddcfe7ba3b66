"""Op boundaries of the compressed layers (DESIGN.md layer 2).

Plain tensor ops with no dependency on the rest of the package: the factorizations call
these functions and nothing lower-level, so a fused kernel can replace each one without
touching the factorizations or modules. Only the PyTorch reference path exists
today; it runs on every device.
"""

from .tensor_train import tt_gather_rows, tt_materialize
from .torch_ops import kron_gather_rows, kron_materialize, kron_matmul, kron_vectors_tree, mixed_radix_digits


__all__ = ["kron_gather_rows", "kron_materialize", "kron_matmul", "kron_vectors_tree", "mixed_radix_digits"]
__all__ += ["tt_gather_rows", "tt_materialize"]
