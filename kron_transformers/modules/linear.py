"""Drop-in replacements for ``nn.Linear`` and transformers' ``Conv1D`` (ARCHITECTURE.md layer 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..factorizations import (
    Factorization,
    KPDFactorization,
    KPDPatternFactorization,
    KroneckerSum,
    LowRankFactorization,
    balanced_factor_shapes,
    build_factorization,
)
from .dense_view import dense_weight_property


LINEAR_LAYOUT = "linear"  # weight stored (out, in), y = x W^T + b
CONV1D_LAYOUT = "conv1d"  # transformers Conv1D: weight stored (in, out), y = x W + b
WEIGHT_LAYOUTS = (LINEAR_LAYOUT, CONV1D_LAYOUT)


class FactorizedLinear(nn.Module):
    """A linear layer whose ``(out, in)`` weight is a structured ``Factorization``.

    ``forward(x) = factorization.matmul(x) + bias``. ``weight`` is a read-only dense view in the
    replaced module's convention (``(out, in)`` for ``nn.Linear``, ``(in, out)`` for ``Conv1D``) so
    code that reads ``.weight`` (HF init functions, dtype/device probes) keeps working.
    """

    def __init__(self, factorization: Factorization, bias: bool = True, weight_layout: str = LINEAR_LAYOUT) -> None:
        super().__init__()
        if weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(
                f"{type(self).__name__}: weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}"
            )
        self.factorization = factorization
        self.in_features = factorization.cols
        self.out_features = factorization.rows
        self.weight_layout = weight_layout
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_structure(
        cls,
        structure: dict[str, Any],
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_layout: str = LINEAR_LAYOUT,
    ) -> FactorizedLinear:
        """Rebuild a layer from a recorded ``Factorization.structure()`` (random values)."""
        return cls.wrap(build_factorization(structure, out_features, in_features), bias, weight_layout)

    @staticmethod
    def wrap(factorization: Factorization, bias: bool = True, weight_layout: str = LINEAR_LAYOUT) -> FactorizedLinear:
        """A layer around an existing factorization, typed by it (``KronLinear`` for a Kronecker sum, ...)."""
        module = FactorizedLinear.__new__(LINEAR_CLASSES.get(type(factorization), FactorizedLinear))
        FactorizedLinear.__init__(module, factorization, bias, weight_layout)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factorization.cached_matmul(x, self.bias)

    def materialize(self) -> torch.Tensor:
        """Dense weight in the replaced module's convention."""
        weight = self.factorization.materialize()
        return weight.T if self.weight_layout == CONV1D_LAYOUT else weight

    weight = dense_weight_property(
        lambda module: (
            (module.in_features, module.out_features)
            if module.weight_layout == CONV1D_LAYOUT
            else (module.out_features, module.in_features)
        )
    )

    def num_parameters(self) -> int:
        """Parameters of the factorization plus the bias."""
        return self.factorization.num_parameters() + (self.bias.numel() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        layout = "" if self.weight_layout == LINEAR_LAYOUT else f", weight_layout={self.weight_layout}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{layout}"
        )


class KronLinear(FactorizedLinear):
    """``y = x (sum_k F_1k ⊗ ... ⊗ F_nk)^T + b`` (Shapeshifter / Kronecker / PHM; Panahi, eq. 3.4, 4.3).

    ```py
    layer = KronLinear(768, 3072, rank=16)                                # balanced order-2 shapes
    layer = KronLinear(768, 3072, rank=4, factor_shapes=[(4, 4), (8, 12), (96, 16)])
    ```
    ``factor_shapes`` are ``(rows, cols)`` of each factor of the ``(out, in)`` weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        factor_shapes: Sequence[Sequence[int]] | None = None,
        order: int = 2,
        bias: bool = True,
        weight_layout: str = LINEAR_LAYOUT,
    ) -> None:
        shapes = (
            factor_shapes if factor_shapes is not None else balanced_factor_shapes(out_features, in_features, order)
        )
        super().__init__(KroneckerSum(out_features, in_features, shapes, rank), bias, weight_layout)


class KPDLinear(FactorizedLinear):
    """``y = x (sum_i (S ⊙ A_i) ⊗ B_i)^T + b`` (Zhu et al., eq. 3); ``block_size`` = ``B_i``'s shape."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        block_size: Sequence[int],
        bias: bool = True,
        weight_layout: str = LINEAR_LAYOUT,
    ) -> None:
        super().__init__(KPDFactorization(out_features, in_features, block_size, rank), bias, weight_layout)


class KPDPatternLinear(FactorizedLinear):
    """Pattern selection (Zhu et al., section 5): one KPD term per candidate ``block_sizes`` entry, summed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        block_sizes: Sequence[Sequence[int]],
        bias: bool = True,
        weight_layout: str = LINEAR_LAYOUT,
    ) -> None:
        super().__init__(KPDPatternFactorization(out_features, in_features, block_sizes, rank), bias, weight_layout)


class LowRankLinear(FactorizedLinear):
    """``y = x (U V)^T + b`` with ``U: (out, r)``, ``V: (r, in)``: the low-rank baseline."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, weight_layout: str = LINEAR_LAYOUT
    ) -> None:
        super().__init__(LowRankFactorization(out_features, in_features, rank), bias, weight_layout)


LINEAR_CLASSES: dict[type[Factorization], type[FactorizedLinear]] = {
    KroneckerSum: KronLinear,
    KPDFactorization: KPDLinear,
    KPDPatternFactorization: KPDPatternLinear,
    LowRankFactorization: LowRankLinear,
}
