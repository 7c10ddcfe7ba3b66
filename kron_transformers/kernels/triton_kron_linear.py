"""Fused Triton kernels for the order-2 Kronecker-sum linear layer ``Y = X (sum_k A_k ⊗ B_k)^T``.

Panahi, section 4.3 (Shapeshifter), Zhu et al., eq. 3 (KPD, ``A_k -> S ⊙ A_k``). With a row ``x_n`` viewed as
``X_n`` of shape ``(b1, b2)`` (``torch.kron`` order, padded with zeros to ``b1 * b2`` columns),
``Y_n = sum_k A_k X_n B_k^T`` of shape ``(a1, a2)``, cropped to ``out_features`` (ARCHITECTURE.md, "The math").

Forward, one launch: each program owns a tile of rows and output columns; per chunk of ``j1`` (any ``b1``) and
rank term it forms ``T = X_n B_k^T`` for its rows in registers (``(b1-chunk * rows, a2-tile)``, laid out so that
the second product is a plain 2-D ``tl.dot``) and accumulates ``A_k T`` in fp32; the ``(N, r * b1 * a2)``
intermediate of the PyTorch path never reaches global memory. The input chunk is loaded once for all rank terms
when ``b2`` fits one tile; small ``B_k`` (``a2, b2 <= 8``) form ``T`` by broadcast multiply-adds and pack
``16 / a2`` rows into the dot instead of padding ``a2, b2`` to 16; decode-size batches split the rank over
programs. Backward:

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


MIN_DOT_SIZE = 16  # tl.dot needs every dimension >= 16 on tensor cores
# Tile caps and the fp32 values per register-resident tile (the accumulator, T and U; a tile of E fp32 values
# costs E / (32 * NUM_WARPS) registers per thread), by input dtype. fp32 inputs also keep fp32 operand copies and,
# in IEEE mode, the FMA dot's operand broadcasts, so their tiles are smaller. ``streamed_k`` and
# ``streamed_elements``: the ``BLOCK_K`` slice and the tile budget when ``b2`` does not fit one tile;
# ``grad_a_elements``: the budget of the ``dA`` kernel; ``min_rows``: the fewest rows per program. Chosen so that
# no kernel spills at any preset shape (one-row fp32 tiles, 32-wide streamed fp32 slices, > 512-element streamed
# and > 1024-element ``dA`` fp32 tiles made ptxas spill a few bytes; tests/test_kernel_compile.py compiles them
# all for sm_90 and reads the register use back).
NUM_WARPS = {torch.float32: 8, torch.float16: 8, torch.bfloat16: 8}
# The register file holds 255 per thread at 8 warps; without the cap ptxas targets 128 (sometimes 80) registers
# for some of these kernels and spills a few bytes rather than use more.
MAX_REGISTERS = 255
# fmt: off
TILE_CAPS = {
    torch.float32: dict(
        BLOCK_B1=16, BLOCK_A1=32, BLOCK_A2=32, BLOCK_K=32, elements=2048, streamed_k=16, streamed_elements=512,
        grad_a_elements=1024, min_rows=2,
    ),
    torch.float16: dict(
        BLOCK_B1=32, BLOCK_A1=64, BLOCK_A2=32, BLOCK_K=32, elements=8192, streamed_k=32, streamed_elements=8192,
        grad_a_elements=8192, min_rows=1,
    ),
}
# fmt: on
TILE_CAPS[torch.bfloat16] = TILE_CAPS[torch.float16]
MAX_BLOCK_ROWS = 16
SMALL_BLOCK = 8  # a2, b2 <= 8 (KPD's 4x4 blocks): packed rows x a2 in the dot instead of padding a2, b2 to 16


def _new_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output/partial allocation (every element is written by a kernel; tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _row_block_grid(rows, n_rows, features, stride, offs_outer, outer, offs_inner, inner):
    """Offsets and mask of ``t[o, n, i] = m[n, o * inner + i]`` for a row-major ``m`` with ``features`` columns."""
    cols = offs_outer[:, None, None] * inner + offs_inner[None, None, :]
    mask = (
        (offs_outer[:, None, None] < outer)
        & (rows[None, :, None] < n_rows)
        & (offs_inner[None, None, :] < inner)
        & (cols < features)
    )
    return rows[None, :, None].to(tl.int64) * stride + cols, mask


@triton.jit
def _load_row_blocks(
    ptr, rows, n_rows, features, stride, outer, inner, offs_outer, offs_inner,
    BLOCK_OUTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_INNER: tl.constexpr,
):  # fmt: skip
    """``T[(o, n), i] = m[n, o * inner + i]`` of shape ``(BLOCK_OUTER * BLOCK_N, BLOCK_INNER)`` (zeros outside):
    the input chunk ``X[(j1, n), j2]`` and, reshaped, the output-gradient tile ``dY[i1, (n, i2)]``."""
    offsets, mask = _row_block_grid(rows, n_rows, features, stride, offs_outer, outer, offs_inner, inner)
    return tl.reshape(tl.load(ptr + offsets, mask=mask, other=0.0), (BLOCK_OUTER * BLOCK_N, BLOCK_INNER))


@triton.jit
def _input_for_every_term(
    x_ptr, rows, n_rows, in_features, stride_xn, b1, b2, offs_j1,
    BLOCK_B1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
):  # fmt: skip
    """With ``ONE_K``: the whole input chunk ``X[(j1, n), :]``, loaded once for every rank term; else None."""
    x_first = None
    if ONE_K:
        x_first = _load_row_blocks(
            x_ptr, rows, n_rows, in_features, stride_xn, b1, b2, offs_j1, tl.arange(0, BLOCK_K),
            BLOCK_B1, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    return x_first


@triton.jit
def _kron_tile_product(
    x_ptr, b_ptr, k, rows, n_rows, in_features, stride_xn, stride_br, stride_bi, stride_bj,
    b1, b2, a2, offs_j1, offs_i2, x_first,
    BLOCK_B1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A2: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_K: tl.constexpr, SMALL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``T[(j1, n), i2] = sum_j2 X[n, j1 * b2 + j2] B_k[i2, j2]``, fp32 of shape ``(BLOCK_B1 * BLOCK_N, BLOCK_A2)``.

    ``ONE_K`` (``b2 <= BLOCK_K``): the caller's ``x_first`` is the whole input chunk, loaded once and reused for
    every rank term; otherwise the input is streamed in ``BLOCK_K`` slices. ``SMALL`` (``a2, b2 <= 8``, tiles
    not padded to the 16 of ``tl.dot``): the ``b2``-term sums are broadcast multiply-adds in registers.
    """
    if SMALL:
        offs_j2 = tl.arange(0, BLOCK_K)
        b_mask = (offs_i2[:, None] < a2) & (offs_j2[None, :] < b2)
        b_tile = tl.load(
            b_ptr + k * stride_br + offs_i2[:, None] * stride_bi + offs_j2[None, :] * stride_bj, mask=b_mask, other=0.0
        )
        x3 = tl.reshape(x_first, (BLOCK_B1 * BLOCK_N, 1, BLOCK_K)).to(tl.float32)
        t = tl.sum(x3 * b_tile.to(tl.float32)[None, :, :], axis=2)
    else:
        t = tl.zeros((BLOCK_B1 * BLOCK_N, BLOCK_A2), dtype=tl.float32)
        for start in range(0, b2, BLOCK_K):
            offs_j2 = start + tl.arange(0, BLOCK_K)
            if ONE_K:
                x_tile = x_first
            else:
                x_tile = _load_row_blocks(
                    x_ptr, rows, n_rows, in_features, stride_xn, b1, b2, offs_j1, offs_j2, BLOCK_B1, BLOCK_N, BLOCK_K
                )
            b_mask = (offs_j2[:, None] < b2) & (offs_i2[None, :] < a2)
            b_tile = tl.load(
                b_ptr + k * stride_br + offs_i2[None, :] * stride_bi + offs_j2[:, None] * stride_bj,
                mask=b_mask,
                other=0.0,
            )
            t = tl.dot(x_tile, b_tile, t, input_precision=PRECISION)
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
    n_rows, in_features, out_features, rank, a1, b1, a2, b2, rank_splits, ranks_per_split,
    stride_xn, stride_ys, stride_yn, stride_ar, stride_ai, stride_aj, stride_br, stride_bi, stride_bj,
    stride_si, stride_sj,
    HAS_SCALE: tl.constexpr, BLOCK_B1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A1: tl.constexpr,
    BLOCK_A2: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr, SMALL: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``Y[n, i1 * a2 + i2] = sum_k sum_j1 (S ⊙ A_k)[i1, j1] (X_n B_k^T)[j1, i2]`` for one (rows, i1, i2) tile.

    Grid ``(row tiles * rank_splits, a1 tiles, a2 tiles)``: split ``s`` sums the rank terms
    ``[s * ranks_per_split, (s + 1) * ranks_per_split)`` into ``y[s]`` (decode-size batches fill the device by
    splitting the rank; the launcher sums the splits). ``j1`` is walked in ``BLOCK_B1`` chunks, so ``b1`` is
    unbounded; per chunk the input tile is loaded once for all rank terms when ``b2 <= BLOCK_K``.
    """
    row_tile = tl.program_id(0) // rank_splits
    split = tl.program_id(0) % rank_splits
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i1 = tl.program_id(1) * BLOCK_A1 + tl.arange(0, BLOCK_A1)
    offs_i2 = tl.program_id(2) * BLOCK_A2 + tl.arange(0, BLOCK_A2)
    rank_start = split * ranks_per_split
    rank_end = tl.minimum(rank, rank_start + ranks_per_split)
    acc = tl.zeros((BLOCK_A1, BLOCK_N * BLOCK_A2), dtype=tl.float32)
    for j1_start in range(0, b1, BLOCK_B1):
        offs_j1 = j1_start + tl.arange(0, BLOCK_B1)
        x_first = _input_for_every_term(
            x_ptr, rows, n_rows, in_features, stride_xn, b1, b2, offs_j1, BLOCK_B1, BLOCK_N, BLOCK_K, ONE_K
        )
        for k in range(rank_start, rank_end):
            t = _kron_tile_product(
                x_ptr, b_ptr, k, rows, n_rows, in_features, stride_xn, stride_br, stride_bi, stride_bj,
                b1, b2, a2, offs_j1, offs_i2, x_first, BLOCK_B1, BLOCK_N, BLOCK_A2, BLOCK_K, ONE_K, SMALL, PRECISION,
            )  # fmt: skip
            a_tile = _load_a_tile(
                a_ptr, s_ptr, k, offs_i1[:, None], offs_j1[None, :], a1, b1,
                stride_ar, stride_ai, stride_aj, stride_si, stride_sj, HAS_SCALE,
            )  # fmt: skip
            t = tl.reshape(t, (BLOCK_B1, BLOCK_N * BLOCK_A2)).to(x_ptr.dtype.element_ty)
            acc = tl.dot(a_tile.to(x_ptr.dtype.element_ty), t, acc, input_precision=PRECISION)
    out = tl.reshape(acc, (BLOCK_A1, BLOCK_N, BLOCK_A2))
    offsets, mask = _row_block_grid(rows, n_rows, out_features, stride_yn, offs_i1, a1, offs_i2, a2)
    tl.store(y_ptr + split.to(tl.int64) * stride_ys + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def kron_linear_grad_a_kernel(
    x_ptr, dy_ptr, b_ptr, partial_ptr,
    n_rows, in_features, out_features, a1, b1, a2, b2, num_programs_n, num_tiles_j1,
    stride_xn, stride_dyn, stride_br, stride_bi, stride_bj,
    BLOCK_B1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A1: tl.constexpr, BLOCK_A2: tl.constexpr,
    BLOCK_K: tl.constexpr, ONE_K: tl.constexpr, SMALL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial ``dA_k[i1, j1] = sum_n sum_i2 dY[n, i1 * a2 + i2] (X_n B_k^T)[j1, i2]`` over this program's row tiles.

    Grid ``(P, r, a1 tiles * b1 tiles)``; program ``p`` takes row tiles ``p, p + P, ...`` and writes ``partial[p, k]``.
    """
    pid_p = tl.program_id(0)
    k = tl.program_id(1)
    offs_i1 = (tl.program_id(2) // num_tiles_j1) * BLOCK_A1 + tl.arange(0, BLOCK_A1)
    offs_j1 = (tl.program_id(2) % num_tiles_j1) * BLOCK_B1 + tl.arange(0, BLOCK_B1)
    acc = tl.zeros((BLOCK_A1, BLOCK_B1), dtype=tl.float32)
    for tile in range(pid_p, tl.cdiv(n_rows, BLOCK_N), num_programs_n):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        x_first = _input_for_every_term(
            x_ptr, rows, n_rows, in_features, stride_xn, b1, b2, offs_j1, BLOCK_B1, BLOCK_N, BLOCK_K, ONE_K
        )
        for start in range(0, a2, BLOCK_A2):
            offs_i2 = start + tl.arange(0, BLOCK_A2)
            t = _kron_tile_product(
                x_ptr, b_ptr, k, rows, n_rows, in_features, stride_xn, stride_br, stride_bi, stride_bj,
                b1, b2, a2, offs_j1, offs_i2, x_first, BLOCK_B1, BLOCK_N, BLOCK_A2, BLOCK_K, ONE_K, SMALL, PRECISION,
            )  # fmt: skip
            t = tl.reshape(t, (BLOCK_B1, BLOCK_N * BLOCK_A2)).to(dy_ptr.dtype.element_ty)
            dy = _load_row_blocks(
                dy_ptr, rows, n_rows, out_features, stride_dyn, a1, a2, offs_i1, offs_i2, BLOCK_A1, BLOCK_N, BLOCK_A2
            )
            dy = tl.reshape(dy, (BLOCK_A1, BLOCK_N * BLOCK_A2))
            acc = tl.dot(dy, tl.trans(t), acc, input_precision=PRECISION)
    rank = tl.num_programs(1)
    offsets = ((pid_p * rank + k) * a1 + offs_i1[:, None]) * b1 + offs_j1[None, :]
    tl.store(partial_ptr + offsets, acc, mask=(offs_i1[:, None] < a1) & (offs_j1[None, :] < b1))


@triton.jit
def kron_linear_grad_b_kernel(
    x_ptr, dy_ptr, a_ptr, s_ptr, partial_ptr,
    n_rows, in_features, out_features, a1, b1, a2, b2, num_programs_n, num_tiles_j2,
    stride_xn, stride_dyn, stride_ar, stride_ai, stride_aj, stride_si, stride_sj,
    HAS_SCALE: tl.constexpr, BLOCK_B1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A1: tl.constexpr,
    BLOCK_A2: tl.constexpr, BLOCK_K: tl.constexpr, SMALL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Partial ``dB_k[i2, j2] = sum_n sum_j1 ((S ⊙ A_k)^T dY_n)[j1, i2] X[n, j1 * b2 + j2]``.

    Grid ``(P, r, a2 tiles * b2 tiles)``; program ``p`` takes row tiles ``p, p + P, ...`` and writes ``partial[p, k]``;
    ``U = (S ⊙ A_k)^T dY_n`` is formed ``BLOCK_B1`` rows of ``j1`` at a time.
    """
    pid_p = tl.program_id(0)
    k = tl.program_id(1)
    offs_i2 = (tl.program_id(2) // num_tiles_j2) * BLOCK_A2 + tl.arange(0, BLOCK_A2)
    offs_j2 = (tl.program_id(2) % num_tiles_j2) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_A2, BLOCK_K), dtype=tl.float32)
    for tile in range(pid_p, tl.cdiv(n_rows, BLOCK_N), num_programs_n):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        for j1_start in range(0, b1, BLOCK_B1):
            offs_j1 = j1_start + tl.arange(0, BLOCK_B1)
            u = tl.zeros((BLOCK_B1, BLOCK_N * BLOCK_A2), dtype=tl.float32)
            for start in range(0, a1, BLOCK_A1):
                offs_i1 = start + tl.arange(0, BLOCK_A1)
                a_tile_t = _load_a_tile(
                    a_ptr, s_ptr, k, offs_i1[None, :], offs_j1[:, None], a1, b1,
                    stride_ar, stride_ai, stride_aj, stride_si, stride_sj, HAS_SCALE,
                )  # fmt: skip
                dy = _load_row_blocks(
                    dy_ptr, rows, n_rows, out_features, stride_dyn, a1, a2, offs_i1, offs_i2,
                    BLOCK_A1, BLOCK_N, BLOCK_A2,
                )  # fmt: skip
                dy = tl.reshape(dy, (BLOCK_A1, BLOCK_N * BLOCK_A2))
                u = tl.dot(a_tile_t.to(dy_ptr.dtype.element_ty), dy, u, input_precision=PRECISION)
            u = tl.reshape(u, (BLOCK_B1 * BLOCK_N, BLOCK_A2)).to(x_ptr.dtype.element_ty)
            x_tile = _load_row_blocks(
                x_ptr, rows, n_rows, in_features, stride_xn, b1, b2, offs_j1, offs_j2, BLOCK_B1, BLOCK_N, BLOCK_K
            )
            if SMALL:
                acc += tl.sum(u.to(tl.float32)[:, :, None] * x_tile.to(tl.float32)[:, None, :], axis=0)
            else:
                acc = tl.dot(tl.trans(u), x_tile, acc, input_precision=PRECISION)
    rank = tl.num_programs(1)
    offsets = ((pid_p * rank + k) * a2 + offs_i2[:, None]) * b2 + offs_j2[None, :]
    tl.store(partial_ptr + offsets, acc, mask=(offs_i2[:, None] < a2) & (offs_j2[None, :] < b2))


def _padded(size: int, cap: int, minimum: int = MIN_DOT_SIZE) -> int:
    return min(max(minimum, triton.next_power_of_2(max(size, 1))), cap)


def _precision(dtype: torch.dtype) -> str:
    """fp32 products in IEEE fp32 unless PyTorch itself allows TF32 for matmuls (the setting is moot for halves)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def launch_blocks(
    kernel: str, a1: int, b1: int, a2: int, b2: int, n_rows: int, dtype: torch.dtype, block_n: int | None = None
) -> dict[str, int | bool]:
    """The tile sizes (constexprs) ``kernel`` (``"forward"``, ``"grad_a"``, ``"grad_b"``) is launched with.

    ``(a1, b1, a2, b2)`` are the factor sizes as the kernel sees them (the input gradient runs ``"forward"`` on the
    transposed factors). Rows per program: the largest power of two (at most ``MAX_BLOCK_ROWS``) keeping every
    register tile within ``TILE_CAPS[dtype]``; ``block_n`` overrides it (tests use it to exercise several row
    tiles and partials at tiny sizes). Small second factors (``a2, b2 <= SMALL_BLOCK``) are not padded to 16:
    ``SMALL`` kernels form ``X_n B_k^T`` by broadcast multiply-adds and pack ``16 / a2`` rows into each dot.
    """
    caps = TILE_CAPS[dtype]
    sizes = dict(BLOCK_B1=b1, BLOCK_A1=a1, BLOCK_A2=a2, BLOCK_K=b2)
    blocks = {name: _padded(size, caps[name]) for name, size in sizes.items()}
    if kernel == "grad_b":
        blocks["BLOCK_B1"] = _padded(b1, 16)
    small = a2 <= SMALL_BLOCK and b2 <= SMALL_BLOCK
    streamed = kernel != "grad_b" and b2 > blocks["BLOCK_K"]
    if streamed:
        blocks["BLOCK_K"] = caps["streamed_k"]
    dot_rows = 1
    if small:  # rows x a2 form the dot's N dimension: at least 16 of them
        blocks["BLOCK_A2"], blocks["BLOCK_K"] = _padded(a2, SMALL_BLOCK, 1), _padded(b2, SMALL_BLOCK, 1)
        dot_rows = MIN_DOT_SIZE // blocks["BLOCK_A2"]
        per_row = max(
            blocks["BLOCK_B1"] * blocks["BLOCK_A2"] * blocks["BLOCK_K"], blocks["BLOCK_A1"] * blocks["BLOCK_A2"]
        )
    else:
        per_row = max(blocks["BLOCK_B1"], blocks["BLOCK_A1"]) * max(blocks["BLOCK_A2"], blocks["BLOCK_K"])
    if block_n is None:
        budget = "streamed_elements" if streamed else "grad_a_elements" if kernel == "grad_a" else "elements"
        fit = max(1, caps[budget] // per_row)
        block_n = min(MAX_BLOCK_ROWS, triton.next_power_of_2(max(n_rows, 1)), 1 << (fit.bit_length() - 1))
        block_n = max(block_n, caps["min_rows"])
    blocks["BLOCK_N"] = max(block_n, dot_rows)
    blocks["SMALL"] = small
    if kernel != "grad_b":
        blocks["ONE_K"] = b2 <= blocks["BLOCK_K"]
    return blocks


def _num_partials(n_tiles: int, other_programs: int, device: torch.device) -> int:
    """Programs along the rows for a reduction: enough to fill the device, at most one per row tile."""
    if triton_interpreted() or device.type != "cuda":
        return min(n_tiles, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, (4 * sms) // max(other_programs, 1)))


def _rank_splits(rank: int, programs: int, device: torch.device, rank_splits: int | None) -> int:
    """Rank splits of the forward: 1 unless the other grid dimensions leave the device's SMs idle (decode sizes)."""
    if rank_splits is not None:
        return max(1, min(rank, rank_splits))
    if triton_interpreted() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(rank, sms // max(programs, 1)))


def _launch_forward(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor | None,
    out_features: int,
    block_n: int | None,
    rank_splits: int | None = None,
) -> torch.Tensor:
    """``x (N, in) -> (N, out_features)`` for factors given as (possibly transposed) strided views."""
    n_rows, in_features = x.shape
    rank, a1, b1 = a.shape
    _, a2, b2 = b.shape
    if n_rows == 0 or out_features == 0:
        return _new_buffer((n_rows, out_features), x.dtype, x.device)
    blocks = launch_blocks("forward", a1, b1, a2, b2, n_rows, x.dtype, block_n)
    tiles = (
        triton.cdiv(n_rows, blocks["BLOCK_N"]),
        triton.cdiv(a1, blocks["BLOCK_A1"]),
        triton.cdiv(a2, blocks["BLOCK_A2"]),
    )
    splits = _rank_splits(rank, tiles[0] * tiles[1] * tiles[2], x.device, rank_splits)
    ranks_per_split = triton.cdiv(rank, splits)
    splits = triton.cdiv(rank, ranks_per_split)
    if splits == 1:
        y = _new_buffer((1, n_rows, out_features), x.dtype, x.device)
    else:
        y = _new_buffer((splits, n_rows, out_features), torch.float32, x.device)
    s = scale if scale is not None else a
    s_strides = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
    kron_linear_forward_kernel[(tiles[0] * splits, tiles[1], tiles[2])](
        x, a, b, s, y,
        n_rows, in_features, out_features, rank, a1, b1, a2, b2, splits, ranks_per_split,
        x.stride(0), y.stride(0), y.stride(1), *a.stride(), *b.stride(), *s_strides,
        HAS_SCALE=scale is not None, PRECISION=_precision(x.dtype), **blocks,
        num_warps=NUM_WARPS[x.dtype], maxnreg=MAX_REGISTERS,
    )  # fmt: skip
    return y[0] if splits == 1 else y.sum(0).to(x.dtype)


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
    precision = _precision(x.dtype)
    if need_a:
        blocks = launch_blocks("grad_a", a1, b1, a2, b2, n_rows, x.dtype, block_n)
        tiles_j1 = triton.cdiv(b1, blocks["BLOCK_B1"])
        tiles = triton.cdiv(a1, blocks["BLOCK_A1"]) * tiles_j1
        partials = _num_partials(triton.cdiv(n_rows, blocks["BLOCK_N"]), rank * tiles, x.device)
        partial = _new_buffer((partials, rank, a1, b1), torch.float32, x.device)
        kron_linear_grad_a_kernel[(partials, rank, tiles)](
            x, dy, b, partial,
            n_rows, in_features, out_features, a1, b1, a2, b2, partials, tiles_j1,
            x.stride(0), dy.stride(0), *b.stride(),
            PRECISION=precision, num_warps=NUM_WARPS[x.dtype], maxnreg=MAX_REGISTERS, **blocks,
        )  # fmt: skip
        grad_a = partial.sum(0)
    if need_b:
        blocks = launch_blocks("grad_b", a1, b1, a2, b2, n_rows, x.dtype, block_n)
        tiles_j2 = triton.cdiv(b2, blocks["BLOCK_K"])
        tiles = triton.cdiv(a2, blocks["BLOCK_A2"]) * tiles_j2
        partials = _num_partials(triton.cdiv(n_rows, blocks["BLOCK_N"]), rank * tiles, x.device)
        partial = _new_buffer((partials, rank, a2, b2), torch.float32, x.device)
        s = scale if scale is not None else a
        s_strides = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
        kron_linear_grad_b_kernel[(partials, rank, tiles)](
            x, dy, a, s, partial,
            n_rows, in_features, out_features, a1, b1, a2, b2, partials, tiles_j2,
            x.stride(0), dy.stride(0), *a.stride(), *s_strides,
            HAS_SCALE=scale is not None, PRECISION=precision, **blocks,
            num_warps=NUM_WARPS[x.dtype], maxnreg=MAX_REGISTERS,
        )  # fmt: skip
        grad_b = partial.sum(0)
    return grad_a, grad_b
