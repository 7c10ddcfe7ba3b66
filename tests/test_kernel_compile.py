"""Every fused Kronecker-sum linear kernel (forward, input gradient, factor gradients), fp32/fp16/bf16, compiled
ahead of time for sm_90 at the tile sizes its launcher picks for every preset shape (``kernel_shapes``) and for
BERT-base / Llama-style layers: no register spills, and a table of registers and shared memory.

The table prints with ``pytest -s`` and is appended to ``$KRON_COMPILE_TABLE`` when set. By default one
representative shape per kernel family is compiled (T5-small Shapeshifter feed-forward in fp32 and bf16, ViT-tiny
KPD 4x4 in bf16: about 12 compilations, under a minute uncached, seconds from Triton's cache);
``KRON_COMPILE_ALL=1`` compiles every preset shape and the BERT/Llama layers in all three dtypes (about 200
compilations, 10-15 minutes on two cores).
"""

from __future__ import annotations

import math
import os

import pytest
import torch


triton = pytest.importorskip("triton")

from cuda_compile import compile_for_cuda  # noqa: E402
from kernel_shapes import (  # noqa: E402
    GatherShape,
    KronShape,
    TTShape,
    embedding_gather_shapes,
    large_layer_shapes,
    preset_shapes,
    tt_embedding_shapes,
)

from kron_transformers.kernels.triton_kron_linear import MAX_REGISTERS, NUM_WARPS, launch_blocks  # noqa: E402


MODULE = "kron_transformers.kernels.triton_kron_linear"
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
WARPS = {name: NUM_WARPS[dtype] for dtype, name in DTYPES.items()}
TRAINING_ROWS = 8192  # rows of a training batch (tiles are the same for any count >= 16)
DECODE_ROWS = (1, 8)  # forward only


def _signature(dtype: str, pointers: list[str], scalars: list[str]) -> dict[str, str]:
    partial = {"partial_ptr": "*fp32"}
    return {p: partial.get(p, f"*{dtype}") for p in pointers} | {s: "i32" for s in scalars}


FORWARD_ARGS = (
    ["x_ptr", "a_ptr", "b_ptr", "s_ptr", "y_ptr"],
    "n_rows in_features out_features rank a1 b1 a2 b2 rank_splits ranks_per_split stride_xn stride_ys stride_yn "
    "stride_ar stride_ai stride_aj stride_br stride_bi stride_bj stride_si stride_sj".split(),
)
GRAD_A_ARGS = (
    ["x_ptr", "dy_ptr", "b_ptr", "partial_ptr"],
    "n_rows in_features out_features a1 b1 a2 b2 num_programs_n num_tiles_j1 stride_xn stride_dyn stride_br "
    "stride_bi stride_bj".split(),
)
GRAD_B_ARGS = (
    ["x_ptr", "dy_ptr", "a_ptr", "s_ptr", "partial_ptr"],
    "n_rows in_features out_features a1 b1 a2 b2 num_programs_n num_tiles_j2 stride_xn stride_dyn stride_ar "
    "stride_ai stride_aj stride_si stride_sj".split(),
)
KERNELS = {
    "forward": ("kron_linear_forward_kernel", FORWARD_ARGS),
    "grad_x": ("kron_linear_forward_kernel", FORWARD_ARGS),
    "grad_a": ("kron_linear_grad_a_kernel", GRAD_A_ARGS),
    "grad_b": ("kron_linear_grad_b_kernel", GRAD_B_ARGS),
}


def compile_cases(
    shapes: list[KronShape], dtypes: tuple[torch.dtype, ...] = tuple(DTYPES), decode: bool = True
) -> dict[tuple, list[str]]:
    """``(pass, dtype, constexprs) -> labels of the shapes launching it`` (deduplicated compilations)."""
    cases: dict[tuple, list[str]] = {}
    for shape in shapes:
        for dtype in dtypes:
            dtype_name = DTYPES[dtype]
            precision = "ieee" if dtype == torch.float32 else "tf32"
            launches = [("forward", (shape.a1, shape.b1, shape.a2, shape.b2), rows) for rows in DECODE_ROWS if decode]
            launches += [("forward", (shape.a1, shape.b1, shape.a2, shape.b2), TRAINING_ROWS)]
            launches += [("grad_x", (shape.b1, shape.a1, shape.b2, shape.a2), TRAINING_ROWS)]
            launches += [
                (name, (shape.a1, shape.b1, shape.a2, shape.b2), TRAINING_ROWS) for name in ("grad_a", "grad_b")
            ]
            for name, sizes, rows in launches:
                blocks = launch_blocks("forward" if name == "grad_x" else name, *sizes, rows, dtype)
                if name != "grad_a":
                    blocks["HAS_SCALE"] = shape.kpd
                constexprs = tuple(sorted({**blocks, "PRECISION": precision}.items()))
                cases.setdefault((name, dtype_name, constexprs), []).append(f"{shape.label} r{shape.rank} N={rows}")
    return cases


def _compile_and_check(cases: dict[tuple, list[str]]) -> None:
    kernels = []
    for name, dtype_name, constexprs in cases:
        kernel, (pointers, scalars) = KERNELS[name]
        kernels.append(
            (
                MODULE,
                kernel,
                _signature(dtype_name, pointers, scalars),
                dict(constexprs),
                {"num_warps": WARPS[dtype_name], "maxnreg": MAX_REGISTERS},
            )
        )
    _check_usage(cases, compile_for_cuda(kernels), hidden=("PRECISION",))


def _check_usage(cases: dict[tuple, list[str]], usage: list[dict[str, int]], hidden: tuple[str, ...] = ()) -> None:
    """Print (and append to ``$KRON_COMPILE_TABLE``) the table of ``cases`` and their usage; assert no spills."""
    lines = [
        "| pass | dtype | tiles | registers | spill bytes | shared KB | shapes |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, dtype_name, constexprs), labels, used in zip(cases, cases.values(), usage):
        tiles = " ".join(f"{key.removeprefix('BLOCK_')}={value}" for key, value in constexprs if key not in hidden)
        lines.append(
            f"| {name} | {dtype_name} | {tiles} | {used['registers']} | {used['stack']} | "
            f"{used['shared'] / 1024:.1f} | {'; '.join(labels[:3])}{' ...' if len(labels) > 3 else ''} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("KRON_COMPILE_TABLE"):
        with open(os.environ["KRON_COMPILE_TABLE"], "a") as handle:
            handle.write(table + "\n")
    spilling = [line for line, used in zip(lines[2:], usage) if used["stack"] > 0]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
    assert all(used["registers"] <= MAX_REGISTERS for used in usage)
    assert all(used["shared"] <= 227 * 1024 for used in usage), "over the 227 KB of shared memory per block on sm_90"


def test_representative_shapes_compile_without_spills():
    """T5-small Shapeshifter 2048x512 (fp32 and bf16) and ViT-tiny KPD 4x4 768x192 (bf16), training tiles."""
    shapes = {shape.label: shape for shape in preset_shapes()}
    t5 = shapes["t5_small_shapeshifter_iwslt14 ffn 2048x512"]
    vit = shapes["vit_tiny_kpd_cifar100 ffn 768x192"]
    cases = compile_cases([t5], (torch.float32, torch.bfloat16), decode=False)
    cases.update(compile_cases([vit], (torch.bfloat16,), decode=False))
    _compile_and_check(cases)


every_shape = pytest.mark.skipif(
    not os.environ.get("KRON_COMPILE_ALL"), reason="about 200 compilations: set KRON_COMPILE_ALL=1"
)


@every_shape
def test_every_preset_shape_compiles_without_spills():
    """Every preset's Kronecker-sum linears and tied heads, training and decode tiles, three dtypes."""
    _compile_and_check(compile_cases(preset_shapes()))


@every_shape
def test_bert_and_llama_layers_compile_without_spills():
    _compile_and_check(compile_cases(large_layer_shapes()))


def test_no_preset_or_large_layer_falls_back_to_pytorch():
    """The fused kernels cover every preset shape and BERT/Llama layer, in every dtype (no size limit left)."""
    from kron_transformers.kernels.ops import covers_kpd_matmul, covers_kron_matmul

    for shape in preset_shapes() + large_layer_shapes():
        for dtype in DTYPES:
            a = torch.empty(shape.rank, shape.a1, shape.b1, dtype=dtype, device="meta")
            b = torch.empty(shape.rank, shape.a2, shape.b2, dtype=dtype, device="meta")
            x = torch.empty(8, shape.b1 * shape.b2, dtype=dtype, device="meta")
            if shape.kpd:
                scale = torch.empty(shape.a1, shape.b1, dtype=dtype, device="meta")
                assert covers_kpd_matmul(x, scale, a, b, shape.a1 * shape.a2), shape
            else:
                assert covers_kron_matmul(x, (a, b), shape.a1 * shape.a2), shape


TT_MODULE = "kron_transformers.kernels.triton_tensor_train"
TT_SCALARS = dict(cols="i32", head_size="i32", last_width="i32")


def _tt_signature(kernel: str, dtype: str) -> dict[str, str]:
    if kernel == "_tt_forward_kernel":
        pointers = dict(ids_ptr="*i64", bounds_ptr="*i64", weights_ptr=f"*{dtype}", cores_ptr=f"*{dtype}")
        return pointers | dict(meta_ptr="*i64", out_ptr=f"*{dtype}") | TT_SCALARS
    pointers = dict(grad_ptr="*fp32", slot_ids_ptr="*i64", num_unique_ptr="*i64", cores_ptr=f"*{dtype}")
    return pointers | dict(meta_ptr="*i64", contrib_ptr="*fp32", contrib_width="i32", head_blocks="i32") | TT_SCALARS


def tt_compile_cases(shapes: list[TTShape], dtypes: tuple[torch.dtype, ...] = tuple(DTYPES)) -> dict[tuple, list[str]]:
    """``(kernel, dtype, constexprs) -> labels``: the TT gather/bag forward (pooled, weighted, mean: every branch
    compiled in) and backward at the launcher's tiles (``_blocks``) for each shape."""
    from kron_transformers.kernels.triton_tensor_train import _blocks, _precision

    cases: dict[tuple, list[str]] = {}
    for shape in shapes:
        cores = [torch.empty(core, device="meta") for core in shape.cores]
        _, block_h, block_r, block_b, block_n = _blocks(cores)
        blocks = dict(ORDER=len(cores), BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_B=block_b)
        blocks["PRECISION"] = _precision(block_r)
        for dtype in dtypes:
            for kernel, constexprs in (
                ("_tt_forward_kernel", dict(blocks, POOLED=True, HAS_WEIGHTS=True, MEAN=True)),
                ("_tt_backward_kernel", dict(blocks, BLOCK_N=block_n)),
            ):
                key = (kernel, DTYPES[dtype], tuple(sorted(constexprs.items())))
                cases.setdefault(key, []).append(shape.label)
    return cases


def _compile_and_check_tt(cases: dict[tuple, list[str]]) -> None:
    from kron_transformers.kernels.triton_tensor_train import _launch_options

    kernels = [
        (TT_MODULE, kernel, _tt_signature(kernel, dtype), dict(constexprs),
         _launch_options(dict(constexprs)["BLOCK_R"]))
        for kernel, dtype, constexprs in cases
    ]  # fmt: skip
    _check_usage(cases, compile_for_cuda(kernels))


def test_tt_kernels_compile_without_spills_at_every_rank():
    """TT forward and backward for T5-small's 32100x512 embedding (three cores) at TT ranks 8, 16, 32 and 64
    (rank blocks 16, 32, 64: the broadcast chain, then the matrix-product chain), fp32 and bf16."""
    shapes = [shape for shape in tt_embedding_shapes(num_cores=(3,)) if shape.label.startswith("t5_small")]
    assert {shape.cores[1][0] for shape in shapes} == {8, 16, 32, 64}
    _compile_and_check_tt(tt_compile_cases(shapes, (torch.float32, torch.bfloat16)))


@every_shape
def test_tt_kernels_compile_without_spills_at_every_preset_shape():
    """Every preset model's embedding and the BERT-base / Llama-7B vocabularies, 3 and 4 cores, TT ranks 8-64,
    three dtypes."""
    _compile_and_check_tt(tt_compile_cases(tt_embedding_shapes()))


def test_tt_kernels_cover_every_preset_embedding_at_rank_64():
    from kron_transformers.kernels.coverage import tt_embedding_bag_covers, tt_gather_rows_covers

    for shape in tt_embedding_shapes():
        cores = [torch.empty(core, device="meta") for core in shape.cores]
        ids = torch.zeros(4, dtype=torch.long, device="meta")
        cols = int(shape.label.split(" ")[2].split("x")[1])
        assert tt_gather_rows_covers(ids, cores, cols), shape
        assert tt_embedding_bag_covers(ids, ids[:2], None, cores, cols, "sum"), shape


GATHER_MODULE = "kron_transformers.kernels.triton_gather"
GATHER_SCALARS = dict(rank="i32", cols="i32", head_size="i32", last_width="i32")


def _gather_signature(kernel: str, dtype: str) -> dict[str, str]:
    if kernel == "_kron_gather_forward_kernel":
        return dict(ids_ptr="*i64", factors_ptr=f"*{dtype}", meta_ptr="*i64", out_ptr=f"*{dtype}") | GATHER_SCALARS
    pointers = dict(grad_ptr="*fp32", slot_ids_ptr="*i64", num_unique_ptr="*i64", factors_ptr=f"*{dtype}")
    return (
        pointers | dict(meta_ptr="*i64", contrib_ptr="*fp32", contrib_width="i32", head_blocks="i32") | GATHER_SCALARS
    )


def gather_compile_cases(
    shapes: list[GatherShape], dtypes: tuple[torch.dtype, ...] = tuple(DTYPES)
) -> dict[tuple, list[str]]:
    """``(kernel, dtype, constexprs) -> labels``: the Kronecker row gather's forward and backward at the launcher's
    tiles (``triton_gather._blocks``) for each shape."""
    from kron_transformers.kernels.triton_gather import _blocks

    cases: dict[tuple, list[str]] = {}
    for shape in shapes:
        _, block_h, block_r, block_b, block_bj = _blocks([torch.empty(f, device="meta") for f in shape.factors])
        blocks = dict(ORDER=len(shape.factors), BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_B=block_b)
        for dtype in dtypes:
            for kernel, constexprs in (
                ("_kron_gather_forward_kernel", blocks),
                ("_kron_gather_backward_kernel", dict(blocks, BLOCK_BJ=block_bj)),
            ):
                key = (kernel, DTYPES[dtype], tuple(sorted(constexprs.items())))
                cases.setdefault(key, []).append(shape.label)
    return cases


def _compile_and_check_gather(cases: dict[tuple, list[str]]) -> None:
    from kron_transformers.kernels.triton_gather import _BACKWARD_OPTIONS, _FORWARD_OPTIONS

    options = {"_kron_gather_forward_kernel": _FORWARD_OPTIONS, "_kron_gather_backward_kernel": _BACKWARD_OPTIONS}
    kernels = [
        (GATHER_MODULE, kernel, _gather_signature(kernel, dtype), dict(constexprs), options[kernel])
        for kernel, dtype, constexprs in cases
    ]
    _check_usage(cases, compile_for_cuda(kernels))


def test_gather_kernels_compile_without_spills_at_a_preset_embedding():
    """The row gather of T5-small Shapeshifter's 32100x512 embedding (rank 256: the rank loop), bf16."""
    shapes = [shape for shape in embedding_gather_shapes() if shape.label.startswith("t5_small_shapeshifter")]
    assert shapes
    _compile_and_check_gather(gather_compile_cases(shapes, (torch.bfloat16,)))


@every_shape
def test_gather_kernels_compile_without_spills_at_every_preset_embedding():
    """Every preset's Kronecker-sum embedding and word2ketXS order 2 and 4 on BERT/Llama vocabularies, three dtypes."""
    _compile_and_check_gather(gather_compile_cases(embedding_gather_shapes()))


def test_gather_kernels_cover_every_preset_embedding():
    from kron_transformers.kernels.coverage import kron_gather_rows_covers

    for shape in embedding_gather_shapes():
        factors = [torch.empty(f, device="meta") for f in shape.factors]
        cols = math.prod(f[2] for f in shape.factors)
        assert kron_gather_rows_covers(torch.zeros(4, dtype=torch.long, device="meta"), factors, cols), shape
