"""The interface every factorization of one weight matrix implements (ARCHITECTURE.md layer 1)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class Factorization(nn.Module):
    """Parameters of a structured ``(rows, cols)`` matrix ``W``.

    Subclasses implement ``materialize`` and may override ``matmul`` (``x @ W.T``) and
    ``gather_rows`` (``W[ids]``) with cheaper structured versions. ``structure()`` returns the
    JSON-serializable description that ``build_factorization`` turns back into an identical
    (randomly initialized) container, so a checkpoint can be rebuilt before its weights load.
    """

    kind: ClassVar[str]

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows = int(rows)
        self.cols = int(cols)

    def materialize(self) -> torch.Tensor:
        """The dense ``(rows, cols)`` matrix."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape ``(..., cols)``."""
        return x @ self.materialize().T

    def gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``W[ids]`` for integer ``ids`` of any shape."""
        return self.materialize()[ids]

    def num_parameters(self) -> int:
        """Trainable numbers stored (the compressed size)."""
        return sum(p.numel() for p in self.parameters())

    def structure(self) -> dict[str, Any]:
        """Resolved shapes and ranks, enough to rebuild this container exactly."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_random(self, std: float) -> None:
        """Random init scaled so the materialized entries have standard deviation ``std``."""
        raise NotImplementedError

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> float:
        """Best approximation of a dense ``(rows, cols)`` weight; returns the relative error.

        The error is ``||W - materialize()||_F / ||W||_F`` on the true (cropped) matrix.
        """
        raise NotImplementedError

    @torch.no_grad()
    def fit_calibrated(self, weight: torch.Tensor, second_moment: torch.Tensor) -> tuple[float, float] | None:
        """Minimize ``||(W - W_hat) C^(1/2)||_F`` for the input second moment ``C``.

        Returns the weighted relative error before and after refinement, or None when this
        factorization has no weighted solver (the caller then uses ``fit``).
        """
        return None

    @torch.no_grad()
    def fit_row_weighted(self, weight: torch.Tensor, row_weights: torch.Tensor) -> bool:
        """Minimize the token-frequency-weighted error ``||diag(f)^(1/2)(E - E_hat)||_F`` of an embedding.

        Returns False when this factorization has no row-weighted solver (the caller then uses ``fit``).
        """
        return False

    @torch.no_grad()
    def relative_error(self, weight: torch.Tensor) -> float:
        """``||W - materialize()||_F / ||W||_F`` computed in float64."""
        target = weight.to(torch.float64)
        approximation = self.materialize().to(torch.float64)
        return float((target - approximation).norm() / target.norm().clamp_min(1e-300))

    def extra_repr(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.structure().items() if k != "factorization")
        return f"rows={self.rows}, cols={self.cols}, {details}"


FACTORIZATIONS: dict[str, type[Factorization]] = {}


def register_factorization(cls: type[Factorization]) -> type[Factorization]:
    """Class decorator: make ``cls`` buildable from its ``structure()`` by ``build_factorization``."""
    FACTORIZATIONS[cls.kind] = cls
    return cls


def build_factorization(structure: dict[str, Any], rows: int, cols: int) -> Factorization:
    """Rebuild a factorization container from a recorded ``structure()`` dictionary."""
    arguments = dict(structure)
    kind = arguments.pop("factorization", None)
    if kind not in FACTORIZATIONS:
        raise ValueError(f"unknown factorization {kind!r} in {structure}; known: {sorted(FACTORIZATIONS)}")
    return FACTORIZATIONS[kind](rows, cols, **arguments)
