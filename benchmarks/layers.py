"""Forward+backward time and parameter count of each compressed layer against its dense original, on CPU.

For T5-small and BERT-base sizes, every linear (attention ``d x d``, FFN in ``d -> d_ff``, FFN out
``d_ff -> d``) is timed as dense ``nn.Linear``, Shapeshifter, KPD, low-rank (at Shapeshifter's parameter
count) and PHM. Kronecker layers are also timed through both reference paths the cost model chooses
between: the factored ``kron_matmul`` and materialize-then-``F.linear``. The word embedding is timed as
dense ``nn.Embedding``, word2ketXS (order 2 and 4), word2ket and low-rank.

One step is ``module(x).sum().backward()`` on a ``batch x seq`` input (float32, CPU): linears get a
random activation that requires grad (as inside a network), embeddings random token ids. After warm-up,
the median of ``--repeats`` steps is reported, with gradients cleared before each step.

Run from the repository root::

    python benchmarks/layers.py                       # batch 8 x seq 128, torch's default threads
    python benchmarks/layers.py --quick --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kron_transformers import (
    KPDLinear,
    KronEmbedding,
    KronLinear,
    LowRankEmbedding,
    LowRankLinear,
    Word2KetEmbedding,
)
from kron_transformers.factorizations import KPDFactorization
from kron_transformers.kernels import kron_matmul


WARMUP_STEPS = 2
DEFAULT_REPEATS = 5
QUICK_REPEATS = 2

SHAPESHIFTER_RANK = 16
KPD_RANK = 4
KPD_BLOCK = (4, 4)
PHM_N = 4
LOW_RANK_EMBEDDING_RANK = 64


@dataclass(frozen=True)
class ModelSize:
    name: str
    hidden: int
    intermediate: int
    vocab: int


MODEL_SIZES = (
    ModelSize("T5-small", hidden=512, intermediate=2048, vocab=32128),
    ModelSize("BERT-base", hidden=768, intermediate=3072, vocab=30522),
)


@dataclass
class Case:
    """One table row: a module, the call that runs it, and the input it is timed on."""

    layer: str
    method: str
    shape: str
    module: nn.Module
    run: Callable[[torch.Tensor], torch.Tensor]
    inputs: torch.Tensor


@dataclass(frozen=True)
class Measurement:
    case: Case
    params: int
    milliseconds: float | None
    error: str = ""


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def kronecker_factors(layer: KronLinear | KPDLinear) -> list[torch.Tensor]:
    """The ``(r, a_j, b_j)`` factor stacks whose Kronecker sum is the layer's weight."""
    factorization = layer.factorization
    if isinstance(factorization, KPDFactorization):
        return factorization.kronecker_factors()
    return list(factorization.factors)


def factored_path(layer: KronLinear | KPDLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: kron_matmul(x, kronecker_factors(layer), layer.out_features) + layer.bias


def materialized_path(layer: KronLinear | KPDLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.linear(x, layer.factorization.materialize(), layer.bias)


def kronecker_cases(layer_name: str, method: str, layer: KronLinear | KPDLinear, x: torch.Tensor) -> list[Case]:
    """The layer's own forward (the cost model's choice) and both reference paths."""
    shape = f"{layer.in_features}->{layer.out_features}"
    return [
        Case(layer_name, f"{method} (auto)", shape, layer, layer, x),
        Case(layer_name, f"{method} (factored)", shape, layer, factored_path(layer), x),
        Case(layer_name, f"{method} (materialized)", shape, layer, materialized_path(layer), x),
    ]


def linear_cases(layer_name: str, in_features: int, out_features: int, tokens: tuple[int, int]) -> list[Case]:
    x = torch.randn(*tokens, in_features, requires_grad=True)
    shape = f"{in_features}->{out_features}"
    dense = nn.Linear(in_features, out_features)
    shapeshifter = KronLinear(in_features, out_features, rank=SHAPESHIFTER_RANK)
    kpd = KPDLinear(in_features, out_features, rank=KPD_RANK, block_size=KPD_BLOCK)
    phm_shapes = [(PHM_N, PHM_N), (out_features // PHM_N, in_features // PHM_N)]
    phm = KronLinear(in_features, out_features, rank=PHM_N, factor_shapes=phm_shapes)
    low_rank_rank = max(1, round(shapeshifter.factorization.num_parameters() / (in_features + out_features)))
    low_rank = LowRankLinear(in_features, out_features, rank=low_rank_rank)
    return [
        Case(layer_name, "dense nn.Linear", shape, dense, dense, x),
        *kronecker_cases(layer_name, f"shapeshifter r{SHAPESHIFTER_RANK}", shapeshifter, x),
        *kronecker_cases(layer_name, f"kpd r{KPD_RANK} b{KPD_BLOCK[0]}x{KPD_BLOCK[1]}", kpd, x),
        Case(layer_name, f"lowrank r{low_rank_rank}", shape, low_rank, low_rank, x),
        *kronecker_cases(layer_name, f"phm n{PHM_N}", phm, x),
    ]


def embedding_cases(vocab: int, dim: int, tokens: tuple[int, int]) -> list[Case]:
    ids = torch.randint(vocab, tokens)
    shape = f"{vocab}x{dim}"
    modules: list[tuple[str, nn.Module]] = [
        ("dense nn.Embedding", nn.Embedding(vocab, dim)),
        ("word2ketXS o2 r256", KronEmbedding(vocab, dim, rank=256, order=2)),
        ("word2ketXS o4 r8", KronEmbedding(vocab, dim, rank=8, order=4)),
        ("word2ket o2 r8", Word2KetEmbedding(vocab, dim, rank=8, order=2)),
        (f"lowrank r{LOW_RANK_EMBEDDING_RANK}", LowRankEmbedding(vocab, dim, rank=LOW_RANK_EMBEDDING_RANK)),
    ]
    return [Case("embedding", method, shape, module, module, ids) for method, module in modules]


def model_cases(size: ModelSize, tokens: tuple[int, int]) -> list[Case]:
    return [
        *linear_cases("attention", size.hidden, size.hidden, tokens),
        *linear_cases("ffn in", size.hidden, size.intermediate, tokens),
        *linear_cases("ffn out", size.intermediate, size.hidden, tokens),
        *embedding_cases(size.vocab, size.hidden, tokens),
    ]


def forward_backward_seconds(case: Case) -> float:
    case.module.zero_grad(set_to_none=True)
    case.inputs.grad = None
    start = time.perf_counter()
    case.run(case.inputs).sum().backward()
    return time.perf_counter() - start


def measure(case: Case, repeats: int) -> Measurement:
    params = parameter_count(case.module)
    try:
        for _ in range(WARMUP_STEPS):
            forward_backward_seconds(case)
        seconds = statistics.median(forward_backward_seconds(case) for _ in range(repeats))
    except (RuntimeError, ValueError) as error:
        return Measurement(case, params, None, f"{type(error).__name__}: {error}")
    return Measurement(case, params, seconds * 1e3)


def format_table(measurements: list[Measurement]) -> str:
    """Plain-text table; ratios are against the dense row of the same layer."""
    dense = {m.case.layer: m for m in measurements if m.case.method.startswith("dense")}
    header = ("layer", "method", "shape", "params", "params/dense", "fwd+bwd ms", "time/dense")
    rows = [header]
    for m in measurements:
        reference = dense[m.case.layer]
        params_ratio = f"{m.params / reference.params:.4f}"
        if m.milliseconds is None:
            timing = (m.error, "-")
        else:
            timing = (f"{m.milliseconds:.2f}", f"{m.milliseconds / reference.milliseconds:.2f}x")
        rows.append((m.case.layer, m.case.method, m.case.shape, f"{m.params:,}", params_ratio, *timing))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right_aligned = {3, 4, 5, 6}

    def line(row: tuple[str, ...]) -> str:
        cells = (cell.rjust(widths[i]) if i in right_aligned else cell.ljust(widths[i]) for i, cell in enumerate(row))
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows[1:])])


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for entry in cpuinfo.read_text().splitlines():
            if entry.startswith("model name"):
                return entry.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed steps per row (default {DEFAULT_REPEATS})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} timed steps per row unless --repeats")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    repeats = arguments.repeats or (QUICK_REPEATS if arguments.quick else DEFAULT_REPEATS)
    tokens = (arguments.batch, arguments.seq)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | CPU {cpu_name()} | "
        f"float32, tokens {arguments.batch}x{arguments.seq}, median of {repeats} after {WARMUP_STEPS} warm-up"
    )
    started = time.perf_counter()
    for size in MODEL_SIZES:
        measurements = [measure(case, repeats) for case in model_cases(size, tokens)]
        print(f"\n{size.name} (d={size.hidden}, d_ff={size.intermediate}, vocab={size.vocab})")
        print(format_table(measurements))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
