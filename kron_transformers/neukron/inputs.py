"""Sparse inputs for NeuKron: ``torch.sparse_coo_tensor``, ``scipy.sparse``, or ``(indices, values[, shape])``.

Everything becomes a coalesced ``SparseInput``: ``indices`` (``D x nnz`` long), ``values`` (``nnz``
float64) and ``shape``. Duplicate indices are summed (COO semantics) and explicit zeros dropped, since
only non-zeros enter the ``O(nnz)`` error (Kwon et al., section 4.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


ACCEPTED = (
    "a torch.sparse_coo_tensor, a scipy.sparse matrix, or a tuple (indices, values) / (indices, values, shape) "
    "with indices of shape (order, nnz)"
)


@dataclass(frozen=True)
class SparseInput:
    """A coalesced sparse matrix or tensor: ``x[indices[:, k]] = values[k]``."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    @property
    def order(self) -> int:
        return len(self.shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def squared_norm(self) -> float:
        return float(self.values.square().sum())


def _as_tensor(data: Any, name: str, caller: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(data))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{caller}: {name} must be array-like, got {type(data).__name__}") from error


def _from_scipy(x: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    coo = x.tocoo()
    indices = torch.as_tensor(np.stack([np.asarray(coo.row), np.asarray(coo.col)]).astype(np.int64))
    return indices, torch.as_tensor(np.asarray(coo.data)), tuple(int(n) for n in coo.shape)


def _from_tuple(x: Sequence[Any], caller: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
    if len(x) not in (2, 3):
        raise TypeError(
            f"{caller}: a tuple input must be (indices, values) or (indices, values, shape), got {len(x)} items"
        )
    indices = _as_tensor(x[0], "indices", caller)
    values = _as_tensor(x[1], "values", caller)
    shape = None if len(x) == 2 else tuple(int(n) for n in x[2])
    return indices, values, shape


def as_sparse_input(x: Any, caller: str = "NeuKron.fit") -> SparseInput:
    """Validate and coalesce ``x`` (see module docstring); raise ``TypeError``/``ValueError`` naming ``caller``."""
    shape: tuple[int, ...] | None
    if isinstance(x, SparseInput):
        return x
    if isinstance(x, torch.Tensor):
        if x.layout != torch.sparse_coo:
            raise TypeError(
                f"{caller}: got a {x.layout} tensor of shape {tuple(x.shape)}; expected {ACCEPTED} "
                "(for a dense tensor use x.to_sparse())"
            )
        x = x.detach().cpu().coalesce()
        indices, values, shape = x.indices(), x.values(), tuple(x.shape)
    elif hasattr(x, "tocoo") and hasattr(x, "nnz"):
        indices, values, shape = _from_scipy(x)
    elif isinstance(x, (tuple, list)):
        indices, values, shape = _from_tuple(x, caller)
    else:
        raise TypeError(f"{caller}: got {type(x).__name__}; expected {ACCEPTED}")

    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{caller}: indices must be integers, got dtype {indices.dtype}")
    if indices.dim() != 2:
        raise ValueError(f"{caller}: indices must have shape (order, nnz), got {tuple(indices.shape)}")
    if values.dim() != 1 or values.numel() != indices.shape[1]:
        raise ValueError(
            f"{caller}: values must be a vector with one value per index column ({indices.shape[1]}), "
            f"got shape {tuple(values.shape)}"
        )
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{caller}: values must be real numbers, got dtype {values.dtype}")
    indices, values = indices.long(), values.to(torch.float64)
    if shape is None:
        if indices.shape[1] == 0:
            raise ValueError(f"{caller}: cannot infer the shape of an empty input; pass (indices, values, shape)")
        shape = tuple(int(n) + 1 for n in indices.max(dim=1).values)
    if len(shape) < 2 or len(shape) != indices.shape[0]:
        raise ValueError(
            f"{caller}: indices have {indices.shape[0]} rows but the shape is {shape}; NeuKron needs a matrix or a "
            "tensor of order >= 2 with one index row per mode"
        )
    if indices.numel() and (bool((indices < 0).any()) or bool((indices >= torch.tensor(shape)[:, None]).any())):
        raise ValueError(f"{caller}: indices out of range for shape {shape}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{caller}: values contain NaN or infinity")
    coalesced = torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()
    keep = coalesced.values() != 0
    indices, values = coalesced.indices()[:, keep], coalesced.values()[keep]
    if values.numel() == 0:
        raise ValueError(f"{caller}: the input of shape {shape} has no non-zero entries; nothing to compress")
    return SparseInput(indices.contiguous(), values.contiguous(), shape)
