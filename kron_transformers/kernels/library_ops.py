"""The fused Kronecker-sum linear as ``torch.library`` custom ops, so ``torch.compile`` keeps the Triton kernels.

``kron_transformers::kron_linear(x, a, b, scale, out_features, block_n, rank_splits)`` is
``x (sum_k (S ⊙ A_k) ⊗ B_k)^T`` cropped to ``out_features`` (Shapeshifter: Panahi, "Improving Space Efficiency
of Deep Neural Networks", section 4.3; KPD: "An Efficient Training Algorithm for Models with Block-wise
Sparsity", eq. 3). Its backward is two more ops:

- ``dX = dY (sum_k (S ⊙ A_k)^T ⊗ B_k^T)^T``: ``kron_linear`` itself on the transposed factors (strided views);
- ``kron_transformers::kron_linear_grad_factors(x, dy, a, b, scale, block_n) -> (dA_eff, dB)`` in fp32, then
  ``dA = S ⊙ dA_eff`` and ``dS = sum_k A_k ⊙ dA_eff_k``.

Each op has a fake (meta) implementation giving the output shapes, so Dynamo and AOTAutograd trace them without
running them: a compiled model calls the Triton kernels as opaque ops, graph-break free. The implementations import
Triton on first call only; defining the ops needs none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


@torch.library.custom_op("kron_transformers::kron_linear", mutates_args=())
def kron_linear_op(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | None,
    out_features: int,
    block_n: int | None = None,
    rank_splits: int | None = None,
) -> torch.Tensor:
    """``x (..., in) -> (..., out_features)`` by ``kron_linear_forward_kernel`` (factors may be strided views)."""
    from .triton_kron_linear import _launch_forward

    y = _launch_forward(_flat(x), a, b, scale, out_features, block_n, rank_splits)
    return y.reshape(*x.shape[:-1], out_features)


@kron_linear_op.register_fake
def _(x, a, b, scale, out_features, block_n=None, rank_splits=None):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("kron_transformers::kron_linear_grad_factors", mutates_args=())
def kron_linear_grad_factors_op(
    x: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dA_eff, dB)`` in fp32 by ``kron_linear_grad_a_kernel`` and ``kron_linear_grad_b_kernel``."""
    from .triton_kron_linear import _launch_grad_factors

    flat_x, flat_dy = _flat(x), _flat(dy)
    if flat_x.shape[0] == 0:
        return a.new_zeros(a.shape, dtype=torch.float32), b.new_zeros(b.shape, dtype=torch.float32)
    grad_a, grad_b = _launch_grad_factors(flat_x, flat_dy, a, b, scale, block_n, True, True)
    return grad_a, grad_b


@kron_linear_grad_factors_op.register_fake
def _(x, dy, a, b, scale, block_n=None):
    return a.new_empty(a.shape, dtype=torch.float32), b.new_empty(b.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, a, b, scale, _, block_n, rank_splits = inputs
    ctx.save_for_backward(x, a, b, scale)
    ctx.block_n, ctx.rank_splits = block_n, rank_splits


def _backward(ctx, dy: torch.Tensor):
    x, a, b, scale = ctx.saved_tensors
    need_x, need_a, need_b, need_s = ctx.needs_input_grad[:4]
    dy = dy.contiguous()
    grad_x = grad_a = grad_b = grad_s = None
    if need_x:
        scale_t = scale.transpose(0, 1) if scale is not None else None
        a_t, b_t = a.transpose(1, 2), b.transpose(1, 2)
        grad_x = kron_linear_op(dy, a_t, b_t, scale_t, x.shape[-1], ctx.block_n, ctx.rank_splits)
    if need_a or need_b or need_s:
        grad_a_eff, grad_b = kron_linear_grad_factors_op(x, dy, a, b, scale, ctx.block_n)
        grad_a = (grad_a_eff * scale if scale is not None else grad_a_eff).to(a.dtype)
        grad_s = (grad_a_eff * a).sum(0).to(scale.dtype) if need_s else None
        grad_b = grad_b.to(b.dtype)
    return grad_x, grad_a, grad_b, grad_s, None, None, None


kron_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _check_factors(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None, out_features: int
) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"kron_linear: factors must be (r, a1, b1) and (r, a2, b2) with the same rank r, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if x.shape[-1] > a.shape[2] * b.shape[2]:
        raise ValueError(
            f"kron_linear: input has {x.shape[-1]} features but the factors take at most "
            f"b1 * b2 = {a.shape[2] * b.shape[2]}"
        )
    if not 0 <= out_features <= a.shape[1] * b.shape[1]:
        raise ValueError(
            f"kron_linear: out_features must be in [0, a1 * a2 = {a.shape[1] * b.shape[1]}], got {out_features}"
        )
    if scale is not None and tuple(scale.shape) != tuple(a.shape[1:]):
        raise ValueError(f"kron_linear: KPD scale S must have shape {tuple(a.shape[1:])}, got {tuple(scale.shape)}")


def kron_linear(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    out_features: int,
    scale: torch.Tensor | None = None,
    block_n: int | None = None,
    rank_splits: int | None = None,
) -> torch.Tensor:
    """``x (..., in) -> (..., out_features)``: ``x (sum_k (S ⊙ A_k) ⊗ B_k)^T`` cropped, by the fused kernels.

    ``a: (r, a1, b1)``, ``b: (r, a2, b2)``, optional KPD ``scale: (a1, b1)``; ``block_n`` fixes the rows per
    program and ``rank_splits`` the programs sharing the rank sum (by default chosen to fill the device at decode
    sizes); tests use both to exercise several row tiles, partials and splits at tiny sizes.
    """
    _check_factors(x, a, b, scale, out_features)
    return kron_linear_op(x, a.contiguous(), b.contiguous(), scale, out_features, block_n, rank_splits)


def kron_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], out_features: int) -> torch.Tensor:
    """Fused ``torch_ops.kron_matmul`` for order 2 (same signature)."""
    first, second = factors
    return kron_linear(x, first, second, out_features)


def kpd_matmul(
    x: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_features: int
) -> torch.Tensor:
    """Fused ``x (sum_i (S ⊙ A_i) ⊗ B_i)^T`` (seed 001, eq. 3) with ``S`` applied inside the kernel."""
    return kron_linear(x, a, b, out_features, scale=scale)
