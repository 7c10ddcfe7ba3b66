"""Time and parameter count of each compressed layer against its dense original, and the matmul-path routing, on CPU.

For T5-small and BERT-base sizes, every linear (attention ``d x d``, FFN in ``d -> d_ff``, FFN out
``d_ff -> d``) is timed as dense ``nn.Linear``, Shapeshifter, KPD, low-rank (at Shapeshifter's parameter
count) and PHM. Kronecker layers are also timed through both reference paths the cost model chooses
between: the factored ``kron_matmul`` and materialize-then-``F.linear``. The word embedding is timed as
dense ``nn.Embedding``, word2ketXS (order 2 and 4), word2ket and low-rank.

``--mode train`` (default): one step is ``module(x).sum().backward()`` on a ``batch x seq`` input
(float32, CPU); linears get a random activation that requires grad (as inside a network), embeddings
random token ids. ``--mode inference``: one step is ``module(x)`` under ``torch.no_grad()`` in eval mode,
with extra "(cache)" rows for each compressed module after ``kt.prepare_for_inference(cache="dense")``.
Rounds are interleaved: each round runs one step of every row of a layer, the dense one included, in
an order rotated from round to round, so load changes on a shared machine hit all rows alike; a row
reports its median step time and the median over rounds of its time divided by the dense row's time in
the same round.

``--mode routing``: at every point issue 16 lists (shape, tokens, rank; forward and forward+backward)
the layer's own forward (``auto``: the cost model's choice) is timed against both paths it chooses
between, interleaved; ``auto/faster`` is the median per-round ratio of auto to the faster path.

Run from the repository root::

    python benchmarks/layers.py                       # batch 8 x seq 128, torch's default threads
    python benchmarks/layers.py --quick --threads 1
    python benchmarks/layers.py --mode inference --threads 1
    python benchmarks/layers.py --mode routing --threads 1
    python benchmarks/layers.py --mode inference --threads 1 --clock cpu    # on a loaded machine
"""

from __future__ import annotations

import argparse
import copy
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
    TiedFactorizedHead,
    Word2KetEmbedding,
    prepare_for_inference,
)
from kron_transformers.factorizations import KPDFactorization
from kron_transformers.factorizations.cost import cost_model
from kron_transformers.factorizations.kronecker import factored_is_cheaper, kpd_factored_is_cheaper
from kron_transformers.kernels import kpd_matmul, kron_materialize, kron_matmul


# ``--clock cpu``: the process's CPU time, which other processes' load does not inflate (with one thread it
# is the uncontended run time); ``wall`` (default): elapsed time.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = ["wall"]
WARMUP_STEPS = 2
DEFAULT_REPEATS = 5
QUICK_REPEATS = 3

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
    ratio: float | None  # median over rounds of this row's time / the dense row's time in the same round
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


def model_cases(size: ModelSize, tokens: tuple[int, int]) -> list[list[Case]]:
    """One group per layer, its dense row first."""
    return [
        linear_cases("attention", size.hidden, size.hidden, tokens),
        linear_cases("ffn in", size.hidden, size.intermediate, tokens),
        linear_cases("ffn out", size.intermediate, size.hidden, tokens),
        embedding_cases(size.vocab, size.hidden, tokens),
    ]


def with_cached_rows(group: list[Case]) -> list[Case]:
    """Inference: every module's own forward also with the inference cache on (a copy, ``cache="dense"``)."""
    rows = []
    for case in group:
        case.module.eval()
        rows.append(case)
        if case.run is case.module and not case.method.startswith("dense"):
            cached = copy.deepcopy(case.module)
            prepare_for_inference(cached, cache="dense")
            method = case.method.replace(" (auto)", "")
            rows.append(Case(case.layer, f"{method} (cache)", case.shape, cached, cached, case.inputs))
    return rows


@dataclass(frozen=True)
class RoutingPoint:
    """A point where the old cost model misrouted (issue 16): a layer, its two paths and its input."""

    label: str
    module: nn.Module
    factored: Callable[[torch.Tensor], torch.Tensor]
    materialized: Callable[[torch.Tensor], torch.Tensor]
    picks_factored: Callable[[torch.Tensor], bool]
    tokens: int
    features: int


def shapeshifter_point(in_features: int, out_features: int, rank: int, tokens: int) -> RoutingPoint:
    layer = KronLinear(in_features, out_features, rank=rank)
    factors = list(layer.factorization.factors)
    return RoutingPoint(
        f"Shapeshifter r{rank} {in_features}->{out_features}",
        layer,
        lambda x: kron_matmul(x, factors, out_features) + layer.bias,
        lambda x: F.linear(x, kron_materialize(factors, out_features, in_features), layer.bias),
        lambda x: factored_is_cheaper(x, factors, out_features, in_features),
        tokens,
        in_features,
    )


def kpd_point(in_features: int, out_features: int, tokens: int) -> RoutingPoint:
    layer = KPDLinear(in_features, out_features, rank=KPD_RANK, block_size=KPD_BLOCK)
    kpd = layer.factorization
    return RoutingPoint(
        f"KPD r{KPD_RANK} {KPD_BLOCK[0]}x{KPD_BLOCK[1]} {in_features}->{out_features}",
        layer,
        lambda x: kpd_matmul(x, kpd.s, kpd.a, kpd.b, out_features) + layer.bias,
        lambda x: F.linear(x, kpd.materialize(), layer.bias),
        lambda x: kpd_factored_is_cheaper(x, kpd.s, kpd.a, kpd.b, out_features),
        tokens,
        in_features,
    )


def tied_head_point(vocab: int, dim: int, tokens: int) -> RoutingPoint:
    head = TiedFactorizedHead(KronEmbedding(vocab, dim, rank=10, order=2))
    factors = list(head.factorization.factors)
    return RoutingPoint(
        f"word2ketXS o2 r10 tied head {vocab}x{dim}",
        head,
        lambda x: kron_matmul(x, factors, vocab),
        lambda x: F.linear(x, kron_materialize(factors, vocab, dim)),
        lambda x: factored_is_cheaper(x, factors, vocab, dim),
        tokens,
        dim,
    )


def routing_points() -> list[RoutingPoint]:
    """The (shape, tokens, rank) points issue 16 lists."""
    return [
        shapeshifter_point(512, 2048, SHAPESHIFTER_RANK, 32),
        shapeshifter_point(512, 512, SHAPESHIFTER_RANK, 16),
        shapeshifter_point(768, 3072, SHAPESHIFTER_RANK, 64),
        shapeshifter_point(768, 3072, SHAPESHIFTER_RANK, 128),
        shapeshifter_point(768, 3072, 8, 1024),
        shapeshifter_point(512, 2048, 4, 1024),
        kpd_point(512, 2048, 512),
        tied_head_point(32128, 512, 1024),
    ]


ROUTING_COLUMNS = (
    ("point", 40),
    ("tokens", 6),
    ("pass", 7),
    ("auto picks", 11),
    ("factored ms", 11),
    ("materialized ms", 15),
    ("auto ms", 9),
    ("auto/faster", 11),
)


def print_routing_table(repeats: int, max_tokens: int | None) -> None:
    """Auto against both paths at every routing point, forward and forward+backward, interleaved rounds.

    Rows are printed as they finish (a long run on a loaded machine shows its progress)."""

    def line(cells) -> str:
        return "  ".join(str(cell).ljust(width) for cell, (_, width) in zip(cells, ROUTING_COLUMNS)).rstrip()

    print(line(name for name, _ in ROUTING_COLUMNS))
    print("-" * len(line(name for name, _ in ROUTING_COLUMNS)), flush=True)
    for point in routing_points():
        if max_tokens is not None and point.tokens > max_tokens:
            continue
        for backward in (False, True):
            x = torch.randn(1, point.tokens, point.features, requires_grad=backward)
            cases = [
                Case("", path, "", point.module, run, x)
                for path, run in (("auto", point.module), ("factored", point.factored), ("mat", point.materialized))
            ]
            times: list[list[float]] = [[], [], []]
            for round_index in range(WARMUP_STEPS + repeats):
                for index in rotated(range(len(cases)), round_index):
                    seconds = step_seconds(cases[index], backward)
                    if round_index >= WARMUP_STEPS:
                        times[index].append(seconds)
            with torch.enable_grad() if backward else torch.no_grad():
                picks = "factored" if point.picks_factored(x) else "materialize"
            ratio = statistics.median(a / min(f, m) for a, f, m in zip(*times))
            medians = [statistics.median(t) * 1e3 for t in times]
            cells = (point.label, point.tokens, "fwd+bwd" if backward else "fwd", picks)
            print(line((*cells, f"{medians[1]:.2f}", f"{medians[2]:.2f}", f"{medians[0]:.2f}", f"{ratio:.2f}x")))
            print(end="", flush=True)


def rotated(indices: range, round_index: int) -> list[int]:
    """``indices`` started at ``round_index`` (mod their count): no row always runs first in its round."""
    shift = round_index % len(indices)
    return [*indices[shift:], *indices[:shift]]


def step_seconds(case: Case, backward: bool) -> float:
    """One step of ``case``: forward+backward with gradients cleared first, or a ``no_grad`` forward."""
    if backward:
        case.module.zero_grad(set_to_none=True)
        case.inputs.grad = None
        start = CLOCKS[CLOCK[0]]()
        case.run(case.inputs).sum().backward()
        return CLOCKS[CLOCK[0]]() - start
    start = CLOCKS[CLOCK[0]]()
    with torch.no_grad():
        case.run(case.inputs)
    return CLOCKS[CLOCK[0]]() - start


def measure_interleaved(cases: list[Case], repeats: int, backward: bool) -> list[Measurement]:
    """Rounds of one step per case (first case = the reference); median time and median per-round ratio."""
    times: list[list[float]] = [[] for _ in cases]
    errors: dict[int, str] = {}
    for round_index in range(WARMUP_STEPS + repeats):
        for index in rotated(range(len(cases)), round_index):
            case = cases[index]
            if index in errors:
                continue
            try:
                seconds = step_seconds(case, backward)
            except (RuntimeError, ValueError) as error:
                errors[index] = f"{type(error).__name__}: {error}"
                continue
            if round_index >= WARMUP_STEPS:
                times[index].append(seconds)
    measurements = []
    for index, case in enumerate(cases):
        params = parameter_count(case.module)
        if index in errors:
            measurements.append(Measurement(case, params, None, None, errors[index]))
            continue
        ratios = [t / reference for t, reference in zip(times[index], times[0])]
        measurements.append(
            Measurement(case, params, statistics.median(times[index]) * 1e3, statistics.median(ratios))
        )
    return measurements


def format_table(measurements: list[Measurement]) -> str:
    """Plain-text table; ratios are against the dense row of the same layer."""
    dense = {m.case.layer: m for m in measurements if m.case.method.startswith("dense")}
    header = ("layer", "method", "shape", "params", "params/dense", "ms (median)", "time/dense (median/round)")
    rows = [header]
    for m in measurements:
        reference = dense[m.case.layer]
        params_ratio = f"{m.params / reference.params:.4f}"
        if m.milliseconds is None:
            timing = (m.error, "-")
        else:
            timing = (f"{m.milliseconds:.2f}", f"{m.ratio:.2f}x")
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
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="wall time or process CPU time (use with --threads 1)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} timed steps per row unless --repeats")
    parser.add_argument(
        "--mode",
        choices=("train", "inference", "routing"),
        default="train",
        help="train: forward+backward; inference: no_grad forward with cache rows; routing: auto vs both paths",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="routing: only the points with at most this many tokens"
    )
    parser.add_argument("--sizes", nargs="*", default=None, help="model sizes to run (default: T5-small BERT-base)")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    CLOCK[0] = arguments.clock
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    repeats = arguments.repeats or (QUICK_REPEATS if arguments.quick else DEFAULT_REPEATS)
    tokens = (arguments.batch, arguments.seq)
    torch.manual_seed(0)
    header = (
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | CPU {cpu_name()} | float32 | "
        f"cost model {cost_model()} | {repeats} interleaved rounds after {WARMUP_STEPS} warm-up | "
        f"clock {arguments.clock}"
    )
    started = time.perf_counter()
    if arguments.mode == "routing":
        print(header, flush=True)
        print_routing_table(repeats, arguments.max_tokens)
    else:
        print(f"{header} | {arguments.mode} | tokens {arguments.batch}x{arguments.seq}")
        backward = arguments.mode == "train"
        for size in MODEL_SIZES:
            if arguments.sizes and size.name not in arguments.sizes:
                continue
            measurements = []
            for group in model_cases(size, tokens):
                measurements += measure_interleaved(group if backward else with_cached_rows(group), repeats, backward)
            print(f"\n{size.name} (d={size.hidden}, d_ff={size.intermediate}, vocab={size.vocab})")
            print(format_table(measurements))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
