"""Fused Triton kernels for the order-2 Kronecker-sum linear layer ``Y = X (sum_k A_k ⊗ B_k)^T``.

Panahi, section 4.3 (Shapeshifter), Zhu et al., eq. 3 (KPD, ``A_k -> S ⊙ A_k``). With a row ``x_n`` viewed as
``X_n`` of shape ``(b1, b2)`` (``torch.kron`` order, padded with zeros to ``b1 * b2`` columns),
``Y_n = sum_k A_k X_n B_k^T`` of shape ``(a1, a2)``, cropped to ``out_features`` (ARCHITECTURE.md, "The math").

Forward, one launch: each program owns a tile of rows and output columns; per rank term it forms
``T = X_n B_k^T`` for its rows in registers (``(b1 * rows, a2-tile)``, laid out so that the second product is a
plain 2-D ``tl.dot``) and accumulates ``A_k T`` in fp32; the ``(N, r * b1 * a2)`` intermediate of the PyTorch
path never reaches global memory. Backward:

- ``dX_n = sum_k A_k^T dY_n B_k``: the forward kernel on the transposed factors (free: strides);
- ``dA_k = sum_n dY_n (X_n B_k^T)^T`` and ``dB_k = sum_n (A_k^T dY_n)^T X_n``: each program reduces a strided
  set of row tiles into its own fp32 partial, and the partials are summed afterwards (deterministic, no
  atomics on the tiny, hot factor gradients);
- KPD: ``dA = S ⊙ dA_eff`` and ``dS = sum_k A_k ⊙ dA_eff_k`` on the ``(r, a1, b1)`` result.

Inputs fp32, fp16 or bf16 (all the same dtype); products accumulate in fp32. For half inputs the intermediate
``T`` is rounded to the input dtype before the second product, as the two-GEMM PyTorch path does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpreted


REGISTER_TILE_ELEMENTS = 8192  # fp32 values per register tile (T, X and the accumulator)
NUM_WARPS = 8  # 256 threads: 32 registers per thread per full tile
MIN_DOT_SIZE = 16  # tl.dot needs every dimension >= 16 on tensor cores


def _new_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output/partial allocation (every element is written by a kernel; tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _kron_tile_product(
    x_ptr, b_ptr, k, rows, n_rows, in_features, stride_xn, stride_br, stride_bi, stride_bj,
    b1, b2, a2, offs_j1, offs_i2,
    B1P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A2: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``T[(j1, n), i2] = sum_j2 X[n, j1 * b2 + j2] B_k[i2, j2]``, fp32 of shape ``(B1P * BLOCK_N, BLOCK_A2)``."""
    t = tl.zeros((B1P * BLOCK_N, BLOCK_A2), dtype=tl.float32)
    for start in range(0, b2, BLOCK_K):
        offs_j2 = start + tl.arange(0, BLOCK_K)
        cols = offs_j1[:, None, None] * b2 + offs_j2[None, None, :]
        x_mask = (
            (offs_j1[:, None, None] < b1)
            & (rows[None, :, None] < n_rows)
            & (offs_j2[None, None, :] < b2)
            & (cols < in_features)
        )
        x_tile = tl.load(x_ptr + rows[None, :, None].to(tl.int64) * stride_xn + cols, mask=x_mask, other=0.0)
        b_mask = (offs_j2[:, None] < b2) & (offs_i2[None, :] < a2)
        b_tile = tl.load(
            b_ptr + k * stride_br + offs_i2[None, :] * stride_bi + offs_j2[:, None] * stride_bj, mask=b_mask, other=0.0
        )
        t = tl.dot(tl.reshape(x_tile, (B1P * BLOCK_N, BLOCK_K)), b_tile, t, input_precision=PRECISION)
    return t


@triton.jit
def _load_a_tile(
    a_ptr, s_ptr, k, offs_i, offs_j, a1, b1,
    stride_ar, stride_ai, stride_aj, stride_si, stride_sj, HAS_SCALE: tl.constexpr,
):  # fmt: skip
    """``(S ⊙ A_k)[offs_i, offs_j]`` (zeros outside ``(a1, b1)``); offsets may be 2-D broadcast grids."""
    mask = (offs_i < a1) & (offs_j < b1)
    a_tile = tl.load(a_ptr + k * stride_ar + offs_i * stride_ai + offs_j * stride_aj, mask=mask, other=0.0)
    if HAS_SCALE:
        a_tile = a_tile * tl.load(s_ptr + offs_i * stride_si + offs_j * stride_sj, mask=mask, other=0.0)
    return a_tile


@triton.jit
def kron_linear_forward_kernel(
    x_ptr, a_ptr, b_ptr, s_ptr, y_ptr,
    n_rows, in_features, out_features, rank, a1, b1, a2, b2,
    stride_xn, stride_yn, stride_ar, stride_ai, stride_aj, stride_br, stride_bi, stride_bj, stride_si, stride_sj,
    HAS_SCALE: tl.constexpr, B1P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A1: tl.constexpr,
    BLOCK_A2: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``Y[n, i1 * a2 + i2] = sum_k sum_j1 (S ⊙ A_k)[i1, j1] (X_n B_k^T)[j1, i2]`` for one (rows, i1, i2) tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i1 = tl.program_id(1) * BLOCK_A1 + tl.arange(0, BLOCK_A1)
    offs_i2 = tl.program_id(2) * BLOCK_A2 + tl.arange(0, BLOCK_A2)
    offs_j1 = tl.arange(0, B1P)
    acc = tl.zeros((BLOCK_A1, BLOCK_N * BLOCK_A2), dtype=tl.float32)
    for k in range(rank):
        t = _kron_tile_product(
            x_ptr, b_ptr, k, rows, n_rows, in_features, stride_xn, stride_br, stride_bi, stride_bj,
            b1, b2, a2, offs_j1, offs_i2, B1P, BLOCK_N, BLOCK_A2, BLOCK_K, PRECISION,
        )  # fmt: skip
        a_tile = _load_a_tile(
            a_ptr, s_ptr, k, offs_i1[:, None], offs_j1[None, :], a1, b1,
            stride_ar, stride_ai, stride_aj, stride_si, stride_sj, HAS_SCALE,
        )  # fmt: skip
        t = tl.reshape(t, (B1P, BLOCK_N * BLOCK_A2)).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a_tile.to(x_ptr.dtype.element_ty), t, acc, input_precision=PRECISION)
    out = tl.reshape(acc, (BLOCK_A1, BLOCK_N, BLOCK_A2))
    out_cols = offs_i1[:, None, None] * a2 + offs_i2[None, None, :]
    mask = (
        (offs_i1[:, None, None] < a1)
        & (rows[None, :, None] < n_rows)
        & (offs_i2[None, None, :] < a2)
        & (out_cols < out_features)
    )
    tl.store(
        y_ptr + rows[None, :, None].to(tl.int64) * stride_yn + out_cols, out.to(y_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def kron_linear_grad_a_kernel(
    x_ptr, dy_ptr, b_ptr, partial_ptr,
    n_rows, in_features, out_features, a1, b1, a2, b2, num_programs_n,
    stride_xn, stride_dyn, stride_br, stride_bi, stride_bj,
    B1P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A1: tl.constexpr, BLOCK_A2: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial ``dA_k[i1, j1] = sum_n sum_i2 dY[n, i1 * a2 + i2] (X_n B_k^T)[j1, i2]`` over this program's row tiles.

    Grid ``(P, r, a1 tiles)``; program ``p`` takes row tiles ``p, p + P, ...`` and writes ``partial[p, k]``.
    """
    pid_p = tl.program_id(0)
    k = tl.program_id(1)
    offs_i1 = tl.program_id(2) * BLOCK_A1 + tl.arange(0, BLOCK_A1)
    offs_j1 = tl.arange(0, B1P)
    acc = tl.zeros((BLOCK_A1, B1P), dtype=tl.float32)
    for tile in range(pid_p, tl.cdiv(n_rows, BLOCK_N), num_programs_n):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        for start in range(0, a2, BLOCK_A2):
            offs_i2 = start + tl.arange(0, BLOCK_A2)
            t = _kron_tile_product(
                x_ptr, b_ptr, k, rows, n_rows, in_features, stride_xn, stride_br, stride_bi, stride_bj,
                b1, b2, a2, offs_j1, offs_i2, B1P, BLOCK_N, BLOCK_A2, BLOCK_K, PRECISION,
            )  # fmt: skip
            t = tl.reshape(t, (B1P, BLOCK_N * BLOCK_A2)).to(dy_ptr.dtype.element_ty)
            out_cols = offs_i1[:, None, None] * a2 + offs_i2[None, None, :]
            dy_mask = (
                (offs_i1[:, None, None] < a1)
                & (rows[None, :, None] < n_rows)
                & (offs_i2[None, None, :] < a2)
                & (out_cols < out_features)
            )
            dy = tl.load(dy_ptr + rows[None, :, None].to(tl.int64) * stride_dyn + out_cols, mask=dy_mask, other=0.0)
            acc = tl.dot(tl.reshape(dy, (BLOCK_A1, BLOCK_N * BLOCK_A2)), tl.trans(t), acc, input_precision=PRECISION)
    rank = tl.num_programs(1)
    offsets = ((pid_p * rank + k) * a1 + offs_i1[:, None]) * b1 + offs_j1[None, :]
    tl.store(partial_ptr + offsets, acc, mask=(offs_i1[:, None] < a1) & (offs_j1[None, :] < b1))


@triton.jit
def kron_linear_grad_b_kernel(
    x_ptr, dy_ptr, a_ptr, s_ptr, partial_ptr,
    n_rows, in_features, out_features, a1, b1, a2, b2, num_programs_n, num_tiles_j2,
    stride_xn, stride_dyn, stride_ar, stride_ai, stride_aj, stride_si, stride_sj,
    HAS_SCALE: tl.constexpr, B1P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A1: tl.constexpr,
    BLOCK_A2: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial ``dB_k[i2, j2] = sum_n sum_j1 ((S ⊙ A_k)^T dY_n)[j1, i2] X[n, j1 * b2 + j2]``.

    Grid ``(P, r, a2 tiles * b2 tiles)``; program ``p`` takes row tiles ``p, p + P, ...`` and writes ``partial[p, k]``.
    """
    pid_p = tl.program_id(0)
    k = tl.program_id(1)
    offs_i2 = (tl.program_id(2) // num_tiles_j2) * BLOCK_A2 + tl.arange(0, BLOCK_A2)
    offs_j2 = (tl.program_id(2) % num_tiles_j2) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_j1 = tl.arange(0, B1P)
    acc = tl.zeros((BLOCK_A2, BLOCK_K), dtype=tl.float32)
    for tile in range(pid_p, tl.cdiv(n_rows, BLOCK_N), num_programs_n):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        u = tl.zeros((B1P, BLOCK_N * BLOCK_A2), dtype=tl.float32)
        for start in range(0, a1, BLOCK_A1):
            offs_i1 = start + tl.arange(0, BLOCK_A1)
            a_tile_t = _load_a_tile(
                a_ptr, s_ptr, k, offs_i1[None, :], offs_j1[:, None], a1, b1,
                stride_ar, stride_ai, stride_aj, stride_si, stride_sj, HAS_SCALE,
            )  # fmt: skip
            out_cols = offs_i1[:, None, None] * a2 + offs_i2[None, None, :]
            dy_mask = (
                (offs_i1[:, None, None] < a1)
                & (rows[None, :, None] < n_rows)
                & (offs_i2[None, None, :] < a2)
                & (out_cols < out_features)
            )
            dy = tl.load(dy_ptr + rows[None, :, None].to(tl.int64) * stride_dyn + out_cols, mask=dy_mask, other=0.0)
            u = tl.dot(
                a_tile_t.to(dy_ptr.dtype.element_ty),
                tl.reshape(dy, (BLOCK_A1, BLOCK_N * BLOCK_A2)),
                u,
                input_precision=PRECISION,
            )
        u = tl.reshape(u, (B1P * BLOCK_N, BLOCK_A2)).to(x_ptr.dtype.element_ty)
        cols = offs_j1[:, None, None] * b2 + offs_j2[None, None, :]
        x_mask = (
            (offs_j1[:, None, None] < b1)
            & (rows[None, :, None] < n_rows)
            & (offs_j2[None, None, :] < b2)
            & (cols < in_features)
        )
        x_tile = tl.load(x_ptr + rows[None, :, None].to(tl.int64) * stride_xn + cols, mask=x_mask, other=0.0)
        acc = tl.dot(tl.trans(u), tl.reshape(x_tile, (B1P * BLOCK_N, BLOCK_K)), acc, input_precision=PRECISION)
    rank = tl.num_programs(1)
    offsets = ((pid_p * rank + k) * a2 + offs_i2[:, None]) * b2 + offs_j2[None, :]
    tl.store(partial_ptr + offsets, acc, mask=(offs_i2[:, None] < a2) & (offs_j2[None, :] < b2))


def _padded(size: int, cap: int | None = None) -> int:
    block = max(MIN_DOT_SIZE, triton.next_power_of_2(max(size, 1)))
    return min(block, cap) if cap is not None else block


def _precision(dtype: torch.dtype) -> str:
    """fp32 products in IEEE fp32 unless PyTorch itself allows TF32 for matmuls (the setting is moot for halves)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _block_rows(contracted: int, tile: int, n_rows: int, block_n: int | None) -> int:
    """Rows per program: the largest power of two keeping ``contracted x rows x tile`` within the register budget."""
    if block_n is not None:
        return block_n
    fit = max(1, REGISTER_TILE_ELEMENTS // (contracted * tile))
    return max(1, min(16, triton.next_power_of_2(max(n_rows, 1)), 1 << (fit.bit_length() - 1)))


def _num_partials(n_tiles: int, other_programs: int, device: torch.device) -> int:
    """Programs along the rows for a reduction: enough to fill the device, at most one per row tile."""
    if triton_interpreted() or device.type != "cuda":
        return min(n_tiles, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, (4 * sms) // max(other_programs, 1)))


def _launch_forward(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | None,
    out_features: int,
    block_n: int | None,
) -> torch.Tensor:
    """``x (N, in) -> (N, out_features)`` for factors given as (possibly transposed) strided views."""
    n_rows, in_features = x.shape
    _, a1, b1 = a.shape
    _, a2, b2 = b.shape
    y = _new_buffer((n_rows, out_features), x.dtype, x.device)
    if n_rows == 0 or out_features == 0:
        return y
    b1_padded = _padded(b1)
    block_a1 = _padded(a1, 64)
    block_a2 = _padded(a2, 32)
    block_k = _padded(b2, 32)
    rows = _block_rows(max(b1_padded, block_a1), max(block_a2, block_k), n_rows, block_n)
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(a1, block_a1), triton.cdiv(a2, block_a2))
    s = scale if scale is not None else a
    s_strides = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
    kron_linear_forward_kernel[grid](
        x, a, b, s, y,
        n_rows, in_features, out_features, a.shape[0], a1, b1, a2, b2,
        x.stride(0), y.stride(0), *a.stride(), *b.stride(), *s_strides,
        HAS_SCALE=scale is not None, B1P=b1_padded, BLOCK_N=rows, BLOCK_A1=block_a1,
        BLOCK_A2=block_a2, BLOCK_K=block_k, PRECISION=_precision(x.dtype), num_warps=NUM_WARPS,
    )  # fmt: skip
    return y


def _launch_grad_factors(
    x: torch.Tensor,
    dy: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | None,
    block_n: int | None,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dA_eff, dB)`` in fp32, each the sum of per-program partials (``None`` where not needed)."""
    n_rows, in_features = x.shape
    rank, a1, b1 = a.shape
    _, a2, b2 = b.shape
    out_features = dy.shape[1]
    grad_a = grad_b = None
    b1_padded = _padded(b1)
    block_a1 = _padded(a1, 64)
    block_a2 = _padded(a2, 32)
    block_k = _padded(b2, 32)
    precision = _precision(x.dtype)
    if need_a:
        rows = _block_rows(max(b1_padded, block_a1), max(block_a2, block_k), n_rows, block_n)
        tiles_a1 = triton.cdiv(a1, block_a1)
        partials = _num_partials(triton.cdiv(n_rows, rows), rank * tiles_a1, x.device)
        partial = _new_buffer((partials, rank, a1, b1), torch.float32, x.device)
        kron_linear_grad_a_kernel[(partials, rank, tiles_a1)](
            x, dy, b, partial,
            n_rows, in_features, out_features, a1, b1, a2, b2, partials,
            x.stride(0), dy.stride(0), *b.stride(),
            B1P=b1_padded, BLOCK_N=rows, BLOCK_A1=block_a1, BLOCK_A2=block_a2, BLOCK_K=block_k, PRECISION=precision,
            num_warps=NUM_WARPS,
        )  # fmt: skip
        grad_a = partial.sum(0)
    if need_b:
        rows = _block_rows(max(b1_padded, block_a1), max(block_a2, block_k), n_rows, block_n)
        tiles_j2 = triton.cdiv(b2, block_k)
        tiles = triton.cdiv(a2, block_a2) * tiles_j2
        partials = _num_partials(triton.cdiv(n_rows, rows), rank * tiles, x.device)
        partial = _new_buffer((partials, rank, a2, b2), torch.float32, x.device)
        s = scale if scale is not None else a
        s_strides = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
        kron_linear_grad_b_kernel[(partials, rank, tiles)](
            x, dy, a, s, partial,
            n_rows, in_features, out_features, a1, b1, a2, b2, partials, tiles_j2,
            x.stride(0), dy.stride(0), *a.stride(), *s_strides,
            HAS_SCALE=scale is not None, B1P=b1_padded, BLOCK_N=rows, BLOCK_A1=block_a1, BLOCK_A2=block_a2,
            BLOCK_K=block_k, PRECISION=precision, num_warps=NUM_WARPS,
        )  # fmt: skip
        grad_b = partial.sum(0)
    return grad_a, grad_b


class KronLinearFunction(torch.autograd.Function):
    """Autograd wrapper: forward and the three backward passes above (four with KPD's ``S``)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: torch.Tensor | None,
        out_features: int,
        block_n: int | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, a, b, scale)
        ctx.block_n = block_n
        return _launch_forward(x, a, b, scale, out_features, block_n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b, scale = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_a, need_b, need_s = ctx.needs_input_grad[:4]
        grad_x = grad_a = grad_b = grad_s = None
        if need_x:
            scale_t = scale.transpose(0, 1) if scale is not None else None
            grad_x = _launch_forward(dy, a.transpose(1, 2), b.transpose(1, 2), scale_t, x.shape[1], ctx.block_n)
        if need_a or need_b or need_s:
            if x.shape[0] == 0:
                grad_a_eff = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
                grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
            else:
                grad_a_eff, grad_b = _launch_grad_factors(x, dy, a, b, scale, ctx.block_n, need_a or need_s, need_b)
            if grad_a_eff is not None:
                grad_a = grad_a_eff * scale if scale is not None else grad_a_eff
                grad_s = (grad_a_eff * a).sum(0).to(scale.dtype) if need_s else None
                grad_a = grad_a.to(a.dtype)
            grad_b = grad_b.to(b.dtype) if need_b else None
        return grad_x, grad_a, grad_b, grad_s, None, None


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
) -> torch.Tensor:
    """``x (..., in) -> (..., out_features)``: ``x (sum_k (S ⊙ A_k) ⊗ B_k)^T`` cropped, by the fused kernels.

    ``a: (r, a1, b1)``, ``b: (r, a2, b2)``, optional KPD ``scale: (a1, b1)``; ``block_n`` fixes the rows per
    program (tests use it to exercise several row tiles and partials at tiny sizes).
    """
    _check_factors(x, a, b, scale, out_features)
    lead_shape = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    y = KronLinearFunction.apply(flat, a.contiguous(), b.contiguous(), scale, out_features, block_n)
    return y.reshape(*lead_shape, out_features)


def kron_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], out_features: int) -> torch.Tensor:
    """Fused ``torch_ops.kron_matmul`` for order 2 (same signature)."""
    first, second = factors
    return kron_linear(x, first, second, out_features)


def kpd_matmul(
    x: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out_features: int
) -> torch.Tensor:
    """Fused ``x (sum_i (S ⊙ A_i) ⊗ B_i)^T`` (seed 001, eq. 3) with ``S`` applied inside the kernel."""
    return kron_linear(x, a, b, out_features, scale=scale)
