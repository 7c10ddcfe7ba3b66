"""The interface every factorization of one weight matrix implements (ARCHITECTURE.md layer 1)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .weighted import CALIBRATED_TIME_RATIO


RELATIVE_ERROR_BLOCK = 2**20  # float64 entries per block of ``relative_error`` (8 MB)


class Factorization(nn.Module):
    """Parameters of a structured ``(rows, cols)`` matrix ``W``.

    Subclasses implement ``materialize`` and may override ``matmul`` (``x @ W.T``) and
    ``gather_rows`` (``W[ids]``) with cheaper structured versions. ``structure()`` returns the
    JSON-serializable description that ``build_factorization`` turns back into an identical
    (randomly initialized) container, so a checkpoint can be rebuilt before its weights load.

    Inference cache (``kron_transformers.prepare_for_inference`` turns it on): ``cached_matmul`` and
    ``cached_gather_rows`` read a stored ``materialize()`` instead of rebuilding ``W``. The stored matrix
    is keyed on the ``_version`` counter, ``data_ptr``, dtype and device of every parameter and buffer, so an
    optimizer step, ``load_state_dict`` or ``.to()`` makes it stale and it is rebuilt on the next call.
    It is used only in eval mode, never while gradients can flow to the factors, and never while
    ``torch.compile`` traces (the compiled graph computes ``W`` from the factors); ``train()`` and
    ``.to()`` drop it.
    """

    kind: ClassVar[str]

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows = int(rows)
        self.cols = int(cols)
        self.inference_cache_enabled = False
        self._inference_cache: tuple[tuple, torch.Tensor] | None = None

    def _version_key(self) -> tuple:
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in (*self.parameters(), *self.buffers()))

    def inference_weight(self) -> torch.Tensor | None:
        """The cached dense ``W`` when the inference cache applies to this call (rebuilt if stale), else ``None``."""
        if torch.compiler.is_compiling() or not self.inference_cache_enabled or self.training:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return None
        key = self._version_key()
        if self._inference_cache is None or self._inference_cache[0] != key:
            self._inference_cache = None  # free the stale matrix before building the new one
            with torch.no_grad():
                self._inference_cache = (key, self.materialize())
        return self._inference_cache[1]

    def drop_inference_cache(self) -> None:
        """Free the cached dense ``W`` (the cache stays enabled and refills on the next eval call)."""
        self._inference_cache = None

    def train(self, mode: bool = True) -> Factorization:
        self.drop_inference_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.drop_inference_cache()
        return super()._apply(fn, recurse)

    def cached_matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)``: one GEMM on the inference cache (bias fused) when it applies and is faster,
        else ``matmul``."""
        weight = self.inference_weight()
        if weight is None or self.factored_beats_dense(x, weight):
            output = self.matmul(x)
            return output if bias is None else output + bias
        return F.linear(x, weight, bias)

    def factored_beats_dense(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``matmul(x)`` is faster than one GEMM on the stored ``weight`` (default: never)."""
        return False

    def cached_gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``W[ids]``: rows of the inference cache when it applies, else ``gather_rows``."""
        weight = self.inference_weight()
        return self.gather_rows(ids) if weight is None else F.embedding(ids, weight)

    def matmul_flops_per_row(self) -> int:
        """Multiply-adds of ``matmul`` per input row (the inference cache's ``auto`` mode compares it with
        ``rows * cols``). Default: ``matmul`` materializes, so at least the dense product."""
        return self.rows * self.cols

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
    def fit_calibrated(
        self, weight: torch.Tensor, second_moment: torch.Tensor, time_ratio: float | None = CALIBRATED_TIME_RATIO
    ) -> tuple[float, float] | None:
        """Minimize ``||(W - W_hat) C^(1/2)||_F`` for the input second moment ``C``.

        Returns the weighted relative error before and after refinement, or None when this
        factorization has no weighted solver (the caller then uses ``fit``). Iterative solvers refine for about
        ``time_ratio`` times the unweighted fit's time; None: their full sweep budget (slower, better, and
        independent of the machine's speed and load).
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
        """``||W - materialize()||_F / ||W||_F`` computed in float64, a block of rows at a time.

        The blocks hold ``RELATIVE_ERROR_BLOCK`` float64 entries: three float64 copies of a 6912 x 2560 weight
        were 430 MB, most of the SVD init's peak memory when compressing while loading.
        """
        approximation = self.materialize()
        rows = max(1, RELATIVE_ERROR_BLOCK // max(weight.shape[-1], 1))
        residual, norm = weight.new_zeros(2, dtype=torch.float64)
        for target, approximated in zip(weight.split(rows), approximation.split(rows)):
            target = target.to(torch.float64)
            residual += (target - approximated.to(torch.float64)).square().sum()
            norm += target.square().sum()
        return float(residual.sqrt() / norm.sqrt().clamp_min(1e-300))

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
