"""The fused kernels as ``torch.library`` custom ops, so ``torch.compile`` keeps the Triton kernels: the
Kronecker-sum linear, the factorized-embedding row gathers (Kronecker and tensor-train rows, TT bags) and the
block-sparse linear.

``kron_transformers::kron_linear(x, a, b, scale, out_features, block_n, rank_splits)`` is
``x (sum_k (S ⊙ A_k) ⊗ B_k)^T`` cropped to ``out_features`` (Shapeshifter: Panahi, "Improving Space Efficiency
of Deep Neural Networks", section 4.3; KPD: "An Efficient Training Algorithm for Models with Block-wise
Sparsity", eq. 3). Its backward is two more ops:

- ``dX = dY (sum_k (S ⊙ A_k)^T ⊗ B_k^T)^T``: ``kron_linear`` itself on the transposed factors (strided views);
- ``kron_transformers::kron_linear_grad_factors(x, dy, a, b, scale, block_n) -> (dA_eff, dB)`` in fp32, then
  ``dA = S ⊙ dA_eff`` and ``dS = sum_k A_k ⊙ dA_eff_k``.

Each op has a fake (meta) implementation giving the output shapes, so Dynamo and AOTAutograd trace them without
running them: a compiled model calls the Triton kernels as opaque ops, graph-break free. The implementations import
Triton on first call only; defining the ops needs none. The un-prefixed functions (``kron_matmul``,
``kron_gather_rows``, ``tt_gather_rows``, ``tt_embedding_bag``, ``block_sparse_matmul``) are what the dispatcher
calls, with the signatures of the PyTorch references.
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


# Row gathers of factorized embeddings: word2ketXS / Shapeshifter rows (Panahi, eq. 3.4) and TT-Rec rows and bags
# (Yin et al., eq. 3 and section 4.1). The forward and the factor gradients are Triton kernels (``triton_gather``,
# ``triton_tensor_train``); each backward is one more opaque op returning the gradient of every factor.


def _flat_ids(ids: torch.Tensor) -> torch.Tensor:
    return ids.reshape(-1).contiguous()


@torch.library.custom_op("kron_transformers::kron_gather_rows", mutates_args=())
def kron_gather_rows_op(ids: torch.Tensor, factors: list[torch.Tensor], cols: int) -> torch.Tensor:
    """``W[ids]`` of ``W = sum_k ⊗_j F_jk``, ``(*ids.shape, cols)``, by ``_kron_gather_forward_kernel``."""
    from .triton_gather import gather_forward

    return gather_forward(_flat_ids(ids), factors, cols).reshape(*ids.shape, cols)


@kron_gather_rows_op.register_fake
def _(ids, factors, cols):
    return factors[0].new_empty((*ids.shape, cols))


@torch.library.custom_op("kron_transformers::kron_gather_rows_backward", mutates_args=())
def kron_gather_rows_backward_op(
    ids: torch.Tensor, grad: torch.Tensor, factors: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Every factor's gradient from the rows' gradient ``grad (*ids.shape, cols)`` (ids deduplicated, no atomics)."""
    from .triton_gather import gather_backward

    flat_ids = _flat_ids(ids)
    grads = gather_backward(flat_ids, grad.reshape(len(flat_ids), grad.shape[-1]).contiguous(), factors)
    return [factor_grad.contiguous() for factor_grad in grads]


@kron_gather_rows_backward_op.register_fake
def _(ids, grad, factors):
    return [torch.empty_like(factor) for factor in factors]


def _save_ids_and_factors(ctx, inputs, output) -> None:
    ids, factors = inputs[0], inputs[1]
    ctx.save_for_backward(ids, *factors)


def _kron_gather_rows_backward(ctx, grad: torch.Tensor):
    ids, *factors = ctx.saved_tensors
    return None, kron_gather_rows_backward_op(ids, grad, factors), None


kron_gather_rows_op.register_autograd(_kron_gather_rows_backward, setup_context=_save_ids_and_factors)


@torch.library.custom_op("kron_transformers::tt_gather_rows", mutates_args=())
def tt_gather_rows_op(ids: torch.Tensor, cores: list[torch.Tensor], cols: int) -> torch.Tensor:
    """TT rows ``W[ids]``, ``(*ids.shape, cols)``, by ``_tt_forward_kernel``."""
    from .triton_tensor_train import tt_forward

    return tt_forward(_flat_ids(ids), None, None, cores, cols, mean=False).reshape(*ids.shape, cols)


@tt_gather_rows_op.register_fake
def _(ids, cores, cols):
    return cores[0].new_empty((*ids.shape, cols))


@torch.library.custom_op("kron_transformers::tt_gather_rows_backward", mutates_args=())
def tt_gather_rows_backward_op(ids: torch.Tensor, grad: torch.Tensor, cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every core's gradient from the rows' gradient ``grad (*ids.shape, cols)``, by ``_tt_backward_kernel``."""
    from .triton_tensor_train import tt_backward

    flat_ids = _flat_ids(ids)
    grads = tt_backward(flat_ids, grad.reshape(len(flat_ids), grad.shape[-1]).contiguous(), cores)
    return [core_grad.contiguous() for core_grad in grads]


@tt_gather_rows_backward_op.register_fake
def _(ids, grad, cores):
    return [torch.empty_like(core) for core in cores]


def _tt_gather_rows_backward(ctx, grad: torch.Tensor):
    ids, *cores = ctx.saved_tensors
    return None, tt_gather_rows_backward_op(ids, grad, cores), None


tt_gather_rows_op.register_autograd(_tt_gather_rows_backward, setup_context=_save_ids_and_factors)


@torch.library.custom_op("kron_transformers::tt_embedding_bag", mutates_args=())
def tt_embedding_bag_op(
    ids: torch.Tensor, bounds: torch.Tensor, weights: torch.Tensor | None, cores: list[torch.Tensor], cols: int,
    mean: bool,
) -> torch.Tensor:  # fmt: skip
    """Bag ``b`` pools the TT rows of ``ids[bounds[b]:bounds[b + 1]]`` (1-d ``ids``), ``(len(bounds) - 1, cols)``."""
    from .triton_tensor_train import tt_forward

    return tt_forward(ids, bounds, weights, cores, cols, mean)


@tt_embedding_bag_op.register_fake
def _(ids, bounds, weights, cores, cols, mean):
    return cores[0].new_empty((bounds.shape[0] - 1, cols))


@torch.library.custom_op("kron_transformers::tt_embedding_bag_backward", mutates_args=())
def tt_embedding_bag_backward_op(
    ids: torch.Tensor, bounds: torch.Tensor, weights: torch.Tensor | None, grad: torch.Tensor,
    cores: list[torch.Tensor], mean: bool,
) -> list[torch.Tensor]:  # fmt: skip
    """Every core's gradient from the bags' gradient ``grad (len(bounds) - 1, cols)``."""
    from .triton_tensor_train import tt_bag_backward

    return [core_grad.contiguous() for core_grad in tt_bag_backward(ids, bounds, weights, grad, cores, mean)]


@tt_embedding_bag_backward_op.register_fake
def _(ids, bounds, weights, grad, cores, mean):
    return [torch.empty_like(core) for core in cores]


def _tt_embedding_bag_setup(ctx, inputs, output) -> None:
    ids, bounds, weights, cores, cols, mean = inputs
    ctx.save_for_backward(ids, bounds, weights, *cores)
    ctx.cols, ctx.mean = cols, mean


def _tt_embedding_bag_backward(ctx, grad: torch.Tensor):
    ids, bounds, weights, *cores = ctx.saved_tensors
    core_grads = tt_embedding_bag_backward_op(ids, bounds, weights, grad, cores, ctx.mean)
    weights_grad = None
    if ctx.needs_input_grad[2]:
        if bounds.shape[0] == 1:  # no bags
            weights_grad = torch.zeros_like(weights)
        else:
            # d bag_b / d w_t = W[id_t] for t in bag b (weights come with mode "sum" only)
            bag_of = torch.searchsorted(bounds, torch.arange(ids.shape[0], device=ids.device), right=True) - 1
            rows = tt_gather_rows_op(ids, cores, ctx.cols).float()
            weights_grad = (rows * grad[bag_of].float()).sum(-1).to(weights.dtype)
    return None, None, weights_grad, core_grads, None, None


tt_embedding_bag_op.register_autograd(_tt_embedding_bag_backward, setup_context=_tt_embedding_bag_setup)


def kron_gather_rows(ids: torch.Tensor, factors: Sequence[torch.Tensor], cols: int) -> torch.Tensor:
    """Fused ``torch_ops.kron_gather_rows`` (same signature; arguments as ``coverage.kron_gather_rows_covers``)."""
    return kron_gather_rows_op(ids, [factor.contiguous() for factor in factors], cols)


def tt_gather_rows(ids: torch.Tensor, cores: Sequence[torch.Tensor], cols: int) -> torch.Tensor:
    """Fused ``tensor_train.tt_gather_rows`` (same signature; arguments as ``coverage.tt_gather_rows_covers``)."""
    return tt_gather_rows_op(ids, [core.contiguous() for core in cores], cols)


def tt_embedding_bag(
    ids: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    cores: Sequence[torch.Tensor],
    cols: int,
    mode: str,
) -> torch.Tensor:
    """Fused ``tensor_train.tt_embedding_bag`` (same signature; arguments as ``coverage.tt_embedding_bag_covers``):
    1-d ``ids`` with ``offsets``, or 2-d ``ids`` (one bag per row) without."""
    if offsets is None:
        bags, bag_size = ids.shape
        offsets = torch.arange(bags, device=ids.device) * bag_size
    flat_ids = _flat_ids(ids)
    bounds = torch.cat([offsets.to(torch.int64), offsets.new_full((1,), flat_ids.shape[0], dtype=torch.int64)])
    weights = per_sample_weights.reshape(-1).contiguous() if per_sample_weights is not None else None
    cores = [core.contiguous() for core in cores]
    return tt_embedding_bag_op(flat_ids, bounds, weights, cores, cols, mode == "mean")


# Block-sparse linear (Zhu et al., section 4): the forward by ``block_sparse_matmul_kernel`` (only the stored blocks),
# the backward by the PyTorch reference's block products (``block_sparse_ops.block_sparse_matmul_backward``).


@torch.library.custom_op("kron_transformers::block_sparse_matmul", mutates_args=())
def block_sparse_matmul_op(
    x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, out_features: int
) -> torch.Tensor:
    """``x (..., in) W^T -> (..., out_features)`` for ``W`` in BSR form, by ``block_sparse_matmul_kernel``."""
    from .triton_block_sparse import block_sparse_matmul as launch

    return launch(x, values, crow_indices, col_indices, out_features)


@block_sparse_matmul_op.register_fake
def _(x, values, crow_indices, col_indices, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _block_sparse_setup(ctx, inputs, output) -> None:
    x, values, crow_indices, col_indices, _ = inputs
    ctx.save_for_backward(x, values, crow_indices, col_indices)


def _block_sparse_backward(ctx, grad: torch.Tensor):
    from .block_sparse_ops import block_sparse_matmul_backward

    x, values, crow_indices, col_indices = ctx.saved_tensors
    grad_x, grad_values = block_sparse_matmul_backward(
        x, grad, values, crow_indices, col_indices, ctx.needs_input_grad
    )
    return grad_x, grad_values, None, None, None


block_sparse_matmul_op.register_autograd(_block_sparse_backward, setup_context=_block_sparse_setup)


def block_sparse_matmul(
    x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, out_features: int
) -> torch.Tensor:
    """Fused ``block_sparse_ops.block_sparse_matmul`` (same signature): the kernel forward, differentiable with
    respect to ``x`` and the block values."""
    return block_sparse_matmul_op(
        x, values.contiguous(), crow_indices.contiguous(), col_indices.contiguous(), out_features
    )
