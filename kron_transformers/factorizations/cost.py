"""Which path computes ``x @ W.T`` faster for a structured ``W``: the factored product or materialize-then-matmul.

Each path's work is counted for the forward pass and, when gradients are needed, the backward pass
(``PathCost``: multiply-adds, bytes moved, kernel launches) and priced by a ``DeviceSpeed`` (seconds per
multiply-add, per byte and per launch). The pricing is calibrated per device and dtype by a one-time
micro-benchmark (one large GEMM, one large copy, one tiny op: ``calibrate_device_speed``).

Counts miss what dominates on real hardware at these sizes: GEMMs with an inner dimension of 16-64
(the factored path's) run several times below the large-GEMM rate. So, in the default mode ``"measure"``,
the first call with a new (shapes, rank, token bucket, dtype, device, backward) key times both paths on
that shape (interleaved, best of a few runs; CPU time on CPU, so other processes' load does not bias it)
and remembers the faster one; the counts decide where nothing can be timed (under ``torch.compile``),
in mode ``"count"``, and where they differ by ``CLEAR_MARGIN`` or more (timing the slow path would only
cost time and memory: at rank ~180, a 2x-compressed MiniLM's factored intermediates took 3.5 GB and the
timing tripled a reconstruction's CPU time). Modes (``KRON_TRANSFORMERS_COST_MODEL`` or ``set_cost_model``):

- ``"measure"``: per-shape micro-benchmark, cached (default);
- ``"count"``: counts priced by ``device_speed`` (deterministic; the tests use it);
- ``"factored"`` / ``"materialize"``: always that path.

The two paths round differently, and a measured choice flips from process to process where the paths are close
(word2ketXS's 8000x128 tied head at 12-48 tokens on a loaded 2-core CPU: four different sets of choices in six
processes), so in ``"measure"`` a seeded run does not always repeat its numbers. Under
``torch.use_deterministic_algorithms(True)`` (``transformers.enable_full_determinism``, the recipes'
``--full_determinism``) the default is therefore ``"count"``; a mode set explicitly still applies.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


COST_MODEL_ENV = "KRON_TRANSFORMERS_COST_MODEL"
COST_MODELS = ("measure", "count", "factored", "materialize")
MEASURE_REPEATS = 9
MEASURE_SECONDS = 0.5  # time budget of one shape's measurement beyond its first (warm-up) run of each path
CLEAR_MARGIN = 4.0  # counted costs this far apart decide without a measurement


@dataclass(frozen=True)
class PathCost:
    """Work of one path: multiply-adds, bytes written or read beyond the GEMM operands, kernel launches."""

    flops: float
    bytes: float
    ops: float

    def __add__(self, other: PathCost) -> PathCost:
        return PathCost(self.flops + other.flops, self.bytes + other.bytes, self.ops + other.ops)

    def scaled(self, factor: float) -> PathCost:
        return PathCost(self.flops * factor, self.bytes * factor, self.ops * factor)


@dataclass(frozen=True)
class DeviceSpeed:
    """Seconds per multiply-add, per byte moved and per kernel launch on one device and dtype."""

    seconds_per_flop: float
    seconds_per_byte: float
    seconds_per_op: float

    def seconds(self, cost: PathCost) -> float:
        return cost.flops * self.seconds_per_flop + cost.bytes * self.seconds_per_byte + cost.ops * self.seconds_per_op


# A deterministic default: 20 GFLOP/s (multiply-adds), 5 GB/s, 5 us per launch (one loaded CPU core).
DEFAULT_SPEED = DeviceSpeed(seconds_per_flop=5e-11, seconds_per_byte=2e-10, seconds_per_op=5e-6)

_speeds: dict[tuple[str, torch.dtype], DeviceSpeed] = {}
_decisions: dict[tuple, bool] = {}
_mode_override: list[str] = []


def set_cost_model(mode: str | None) -> None:
    """Choose the mode for this process (``None``: back to ``KRON_TRANSFORMERS_COST_MODEL`` or the default)."""
    if mode is not None and mode not in COST_MODELS:
        raise ValueError(f"set_cost_model: mode must be one of {COST_MODELS} or None, got {mode!r}")
    _mode_override[:] = [] if mode is None else [mode]


def cost_model() -> str:
    """The mode in effect: ``set_cost_model``'s, else the environment variable's, else ``"count"`` under
    ``torch.use_deterministic_algorithms(True)`` and ``"measure"`` otherwise."""
    if _mode_override:
        return _mode_override[0]
    mode = os.environ.get(COST_MODEL_ENV)
    if mode is None:
        return "count" if torch.are_deterministic_algorithms_enabled() else "measure"
    if mode not in COST_MODELS:
        raise ValueError(f"{COST_MODEL_ENV} must be one of {COST_MODELS}, got {mode!r}")
    return mode


def set_device_speed(device: torch.device | str, dtype: torch.dtype, speed: DeviceSpeed | None) -> None:
    """Price counts on ``device``/``dtype`` with ``speed`` (``None`` forgets it); clears remembered decisions."""
    key = (torch.device(device).type, dtype)
    if speed is None:
        _speeds.pop(key, None)
    else:
        _speeds[key] = speed
    _decisions.clear()


def clear_decisions() -> None:
    """Forget every per-shape decision (the next call of each shape decides again)."""
    _decisions.clear()


def device_speed(device: torch.device, dtype: torch.dtype) -> DeviceSpeed:
    """The calibrated or set speed of ``device``/``dtype``, else ``DEFAULT_SPEED``."""
    return _speeds.get((device.type, dtype), DEFAULT_SPEED)


def _best_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` runs: wall time with synchronization on CUDA; on CPU the process's CPU time,
    which a loaded machine does not inflate (time spent preempted by other processes is not counted)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, clock() - start)
    return best


@torch.no_grad()
def calibrate_device_speed(device: torch.device | str, dtype: torch.dtype = torch.float32) -> DeviceSpeed:
    """One-time micro-benchmark of ``device``/``dtype``: a 512x512x512 GEMM, a 4M-element copy, a 1-element add."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(512, 512, generator=generator, device=device, dtype=dtype)
    big = torch.randn(1 << 22, generator=generator, device=device, dtype=dtype)
    tiny = torch.zeros(1, device=device, dtype=dtype)
    a @ a  # warm-up
    per_op = _best_seconds(lambda: tiny + 1, device, 50)
    per_flop = max(_best_seconds(lambda: a @ a, device, MEASURE_REPEATS) - per_op, 1e-9) / 512**3
    per_byte = max(_best_seconds(big.clone, device, MEASURE_REPEATS) - per_op, 1e-9) / (
        2 * big.numel() * big.element_size()
    )
    speed = DeviceSpeed(per_flop, per_byte, per_op)
    set_device_speed(device, dtype, speed)
    return speed


def kron_path_costs(
    factor_shapes: Sequence[tuple[int, int]],
    rank: int,
    tokens: int,
    rows: int,
    cols: int,
    element_size: int,
    backward: bool,
    built: bool = False,
) -> tuple[PathCost, PathCost]:
    """``(factored, materialize)`` costs of ``x @ W.T`` for ``W = sum_k ⊗_j F_jk`` on ``tokens`` rows of ``x``.

    Factored (``kron_matmul``, modes contracted last to first): per mode ``r * others * a_j * b_j``
    multiply-adds and an intermediate of ``r * prod(state)`` elements written and read (plus one
    permuting copy). Materialize: building the padded ``W`` (``r`` multiply-adds and a permuting copy
    per element) then ``tokens * rows * cols``. Backward: the factored path repeats its contractions
    for the input and for the factors (twice the forward); materialize does two GEMMs (input and
    ``W`` gradients) and pushes ``dW`` back through the build (twice the build). ``built``: ``W`` is
    already stored (the inference cache), so materialize is the product alone.
    """
    state = [b for _, b in factor_shapes]
    flops = 0
    traffic = 0
    for mode in reversed(range(len(factor_shapes))):
        a, b = factor_shapes[mode]
        flops += rank * (math.prod(state) // state[mode]) * a * b
        state[mode] = a
        traffic += rank * math.prod(state)
    factored = PathCost(tokens * flops, 3 * tokens * traffic * element_size, 2 * len(factor_shapes))
    padded = math.prod([a for a, _ in factor_shapes]) * math.prod([b for _, b in factor_shapes])
    build = PathCost(rank * padded, 3 * padded * element_size, 2 * len(factor_shapes))
    product = PathCost(tokens * rows * cols, (rows * cols + tokens * (rows + cols)) * element_size, 1)
    materialize = product if built else build + product
    if backward:
        factored = factored.scaled(3)
        materialize = build.scaled(3) + product.scaled(3)
    return factored, materialize


def _measure_factored_is_faster(
    run_factored: Callable[[torch.Tensor], torch.Tensor],
    run_materialize: Callable[[torch.Tensor], torch.Tensor],
    factors: Sequence[torch.Tensor],
    tokens: int,
    cols: int,
    backward: bool,
) -> bool:
    """Time both paths on random data of this shape (detached copies; the global RNG is untouched)."""
    device, dtype = factors[0].device, factors[0].dtype
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, cols, generator=generator, device=device, dtype=dtype)
    copies = [f.detach().clone().requires_grad_(backward) for f in factors]
    x.requires_grad_(backward)

    def step(run):
        def call():
            with torch.enable_grad() if backward else torch.no_grad():
                output = run(x, copies)
                if backward:
                    output.sum().backward()

        return call

    factored, materialize = step(run_factored), step(run_materialize)
    times = {"factored": _best_seconds(factored, device, 1), "materialize": _best_seconds(materialize, device, 1)}
    # interleaved, best of each; fewer rounds for slow shapes (their paths differ by more than the noise)
    rounds = min(MEASURE_REPEATS, max(2, int(MEASURE_SECONDS / max(sum(times.values()), 1e-9))))
    for _ in range(rounds):
        times["factored"] = min(times["factored"], _best_seconds(factored, device, 1))
        times["materialize"] = min(times["materialize"], _best_seconds(materialize, device, 1))
    return times["factored"] <= times["materialize"]


def token_bucket(tokens: int) -> int:
    """Tokens rounded up to a power of two: decisions are remembered per bucket."""
    return 1 << max(int(tokens) - 1, 0).bit_length()


def choose_factored(
    key: tuple,
    costs: Callable[[bool], tuple[PathCost, PathCost]],
    run_factored: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor],
    run_materialize: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor],
    x: torch.Tensor,
    factors: Sequence[torch.Tensor],
    cols: int,
) -> bool:
    """Whether the factored path is faster for this call (see the module docstring for the modes).

    ``key`` identifies the structure (kind, shapes, rank); ``costs(backward)`` returns the counted
    ``(factored, materialize)`` costs; ``run_*(x, factors)`` compute each path for the benchmark.
    """
    mode = cost_model()
    if mode in ("factored", "materialize"):
        return mode == "factored"
    backward = torch.is_grad_enabled() and (x.requires_grad or any(f.requires_grad for f in factors))
    if mode == "count" or torch.compiler.is_compiling():
        speed = device_speed(x.device, x.dtype)
        factored, materialize = costs(backward)
        return speed.seconds(factored) <= speed.seconds(materialize)
    bucket = token_bucket(x.numel() // max(cols, 1))
    decision_key = (key, bucket, x.dtype, x.device.type, backward)
    decision = _decisions.get(decision_key)
    if decision is None:
        speed = device_speed(x.device, x.dtype)
        factored, materialize = (speed.seconds(cost) for cost in costs(backward))
        if max(factored, materialize) >= CLEAR_MARGIN * min(factored, materialize):
            decision = factored <= materialize  # a measurement would only confirm it, at the slow path's cost
        else:
            decision = _measure_factored_is_faster(run_factored, run_materialize, factors, bucket, cols, backward)
        _decisions[decision_key] = decision
    return decision
