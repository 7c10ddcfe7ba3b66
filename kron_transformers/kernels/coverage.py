"""Which arguments each fused embedding kernel takes: plain shape/dtype/device checks, importable without Triton.

The dispatcher (``ops``) asks these predicates before calling a kernel, also while ``torch.compile`` traces a
model (they run on fake tensors and cost nothing at run time); the Triton modules raise with the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ORDER = 8  # Kronecker factors of the row gather
MAX_FACTOR_COLS = 1024
MAX_CORES = 6  # tensor-train cores
MAX_RANK = 64  # tensor-train rank
MAX_CORE_COLS = 1024
BAG_MODES = ("sum", "mean")


def kron_gather_rows_problem(ids: torch.Tensor, factors: Sequence[torch.Tensor], cols: int) -> str | None:
    """Why the kernel cannot take these arguments, or ``None`` when it can."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        return f"ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}"
    if not 2 <= len(factors) <= MAX_ORDER:
        return f"expected 2..{MAX_ORDER} factors, got {len(factors)}"
    for factor in factors:
        if not isinstance(factor, torch.Tensor) or factor.dim() != 3:
            return f"factors must be 3-d (r, a_j, b_j) tensors, got shapes {[tuple(f.shape) for f in factors]}"
    shapes = [tuple(f.shape) for f in factors]
    if len({f.shape[0] for f in factors}) != 1 or factors[0].shape[0] == 0:
        return f"factors must share a positive rank, got shapes {shapes}"
    if len({f.dtype for f in factors}) != 1 or factors[0].dtype not in SUPPORTED_DTYPES:
        return f"factors must share one dtype among {SUPPORTED_DTYPES}, got {[f.dtype for f in factors]}"
    if len({f.device for f in factors} | {ids.device}) != 1:
        return "ids and factors must be on one device"
    if min([min(f.shape[1:]) for f in factors]) < 1 or max([f.shape[2] for f in factors]) > MAX_FACTOR_COLS:
        return f"factor sizes must be in 1..{MAX_FACTOR_COLS} columns with at least one row, got shapes {shapes}"
    if not isinstance(cols, int) or not 0 < cols <= math.prod([f.shape[2] for f in factors]):
        return f"cols must be in 1..prod(b_j) for factor shapes {shapes}, got {cols}"
    return None


def kron_gather_rows_covers(ids: torch.Tensor, factors: Sequence[torch.Tensor], cols: int) -> bool:
    """Whether :func:`kron_gather_rows_triton` takes these arguments.

    Integer ids; 2..8 factors ``(r, a_j, b_j)`` sharing rank ``r >= 1`` and one dtype among
    fp32/fp16/bf16, on the ids' device; ``b_j <= 1024``; ``0 < cols <= prod b_j``.
    """
    return kron_gather_rows_problem(ids, factors, cols) is None


def tt_rows_problem(ids: torch.Tensor, cores: Sequence[torch.Tensor], cols: int) -> str | None:
    """Why the kernels cannot take these ids, cores and cols, or ``None`` when they can."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        return f"ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}"
    if not 2 <= len(cores) <= MAX_CORES:
        return f"expected 2..{MAX_CORES} cores, got {len(cores)}"
    if any(not isinstance(core, torch.Tensor) or core.dim() != 4 for core in cores):
        return f"cores must be 4-d (R_prev, m_k, n_k, R_next) tensors, got {[getattr(c, 'shape', c) for c in cores]}"
    shapes = [tuple(core.shape) for core in cores]
    links = [1] + [core.shape[3] for core in cores[:-1]]
    if [core.shape[0] for core in cores] != links or cores[-1].shape[3] != 1:
        return f"core ranks must chain with R_0 = R_d = 1, got shapes {shapes}"
    if max(links) > MAX_RANK or min([min(core.shape) for core in cores]) < 1:
        return f"TT ranks must be in 1..{MAX_RANK} and every size positive, got shapes {shapes}"
    if max([core.shape[2] for core in cores]) > MAX_CORE_COLS:
        return f"core column sizes n_k must be <= {MAX_CORE_COLS}, got shapes {shapes}"
    if len({core.dtype for core in cores}) != 1 or cores[0].dtype not in SUPPORTED_DTYPES:
        return f"cores must share one dtype among {SUPPORTED_DTYPES}, got {[core.dtype for core in cores]}"
    if len({core.device for core in cores} | {ids.device}) != 1:
        return "ids and cores must be on one device"
    if not isinstance(cols, int) or not 0 < cols <= math.prod([core.shape[2] for core in cores]):
        return f"cols must be in 1..prod(n_k) for core shapes {shapes}, got {cols}"
    return None


def tt_bag_problem(
    ids: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    cores: Sequence[torch.Tensor],
    cols: int,
    mode: str,
) -> str | None:
    problem = tt_rows_problem(ids, cores, cols)
    if problem is not None:
        return problem
    if mode not in BAG_MODES:
        return f"mode must be one of {BAG_MODES}, got {mode!r}"
    if offsets is None:
        if ids.dim() != 2:
            return f"ids without offsets must be 2-d (bags, bag_size), got shape {tuple(ids.shape)}"
    elif ids.dim() != 1 or not isinstance(offsets, torch.Tensor) or offsets.dim() != 1:
        return f"ids and offsets must be 1-d, got shapes {tuple(ids.shape)} and {getattr(offsets, 'shape', offsets)}"
    elif offsets.dtype not in (torch.int32, torch.int64) or offsets.device != ids.device:
        return f"offsets must be an int32/int64 tensor on the ids' device, got {offsets.dtype} on {offsets.device}"
    if per_sample_weights is not None:
        if mode != "sum":
            return "per_sample_weights are only supported with mode='sum' (as nn.EmbeddingBag)"
        if per_sample_weights.shape != ids.shape or per_sample_weights.device != ids.device:
            return f"per_sample_weights must match ids' shape {tuple(ids.shape)} and device"
        if per_sample_weights.dtype not in SUPPORTED_DTYPES:
            return f"per_sample_weights must be one of {SUPPORTED_DTYPES}, got {per_sample_weights.dtype}"
    return None


def tt_gather_rows_covers(ids: torch.Tensor, cores: Sequence[torch.Tensor], cols: int) -> bool:
    """Whether :func:`tt_gather_rows_triton` takes these arguments.

    Integer ids; 2..6 cores ``(R_{k-1}, m_k, n_k, R_k)`` with ``R_0 = R_d = 1``, ranks <= 64,
    ``n_k <= 1024``, one dtype among fp32/fp16/bf16, on the ids' device; ``0 < cols <= prod n_k``.
    """
    return tt_rows_problem(ids, cores, cols) is None


def tt_embedding_bag_covers(
    ids: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    cores: Sequence[torch.Tensor],
    cols: int,
    mode: str,
) -> bool:
    """Whether :func:`tt_embedding_bag_triton` takes these arguments.

    As :func:`tt_gather_rows_covers`, plus: 1-d ids with 1-d int offsets (or 2-d ids and no
    offsets), mode ``"sum"`` or ``"mean"``, per-sample weights (float, ids' shape) only with ``"sum"``.
    """
    return tt_bag_problem(ids, offsets, per_sample_weights, cores, cols, mode) is None
