"""Kernel benchmark: forward+backward of one linear layer, dense vs each Kronecker path, against measured peaks.

Layer sizes of T5-small (512<->2048, 512<->512) and BERT-base (768<->3072, 768<->768; ViT-base has the same
sizes), at batch x seq 8x128 and 64x512 (``--quick``: 8x128 only, fewer repeats). Methods:

- ``dense``: ``nn.Linear``;
- ``factored``: the PyTorch reference ``kernels.torch_ops.kron_matmul`` (``kpd_matmul`` for KPD);
- ``materialized``: ``F.linear(x, W)`` with ``W`` built from the factors on every step;
- ``triton``: the fused kernels (the ``kernels.library_ops`` custom ops over ``kernels.triton_kron_linear``), only
  on CUDA; on CPU the column is skipped (Triton runs there only interpreted, a correctness tool, not a timing).

Compressed layers: Shapeshifter ``KronLinear`` (balanced order-2 shapes, ``--rank``) and ``KPDLinear``
(block ``--kpd-block``, rank ``--kpd-rank``, ``S`` folded into the kernel). Per row: median fwd+bwd time,
achieved TFLOP/s (useful multiply-adds x 2) and GB/s (minimal traffic: read x, dY and the weights, write y, dX
and the weight gradients once), and the fraction of the roofline ``max(flops / peak_flops, bytes / peak_bw)``
for peaks measured first on this device (a large matmul, a large copy). Memory: parameters, and activation
memory, i.e. bytes saved for backward beyond the input and the parameters: on CUDA from
``torch.cuda.max_memory_allocated`` over the forward pass minus the output, on CPU by summing the distinct
storages that autograd saves (``torch.autograd.graph.saved_tensors_hooks``).

Run from the repository root::

    python benchmarks/kernel_speed.py --quick          # CPU: dense / factored / materialized only
    python benchmarks/kernel_speed.py --dtype bfloat16 # on a GPU: adds the Triton column
    python benchmarks/kernel_speed.py --tokens 1,8,1024,8192 --markdown table.md  # 1 x N tokens, markdown rows

``benchmarks/gpu_check.sh`` runs it for bf16 and fp32 and collects the markdown rows into one table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kron_transformers import KPDLinear, KronLinear
from kron_transformers.kernels import dispatch, library_ops, torch_ops


WARMUP_STEPS = 2
DEFAULT_REPEATS = 10
QUICK_REPEATS = 3
LAYER_SIZES = (
    ("T5-small attn", 512, 512),
    ("T5-small ffn in", 512, 2048),
    ("T5-small ffn out", 2048, 512),
    ("BERT/ViT-base attn", 768, 768),
    ("BERT/ViT-base ffn in", 768, 3072),
    ("BERT/ViT-base ffn out", 3072, 768),
)
TOKENS = ((8, 128), (64, 512))
QUICK_TOKENS = ((8, 128),)


@dataclass
class Row:
    layer: str
    tokens: str
    method: str
    params: int
    milliseconds: float | None
    tflops: float = 0.0
    gbps: float = 0.0
    roofline: float = 0.0
    activation_mb: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Peaks:
    tflops: float
    gbps: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_peaks(device: torch.device, dtype: torch.dtype, repeats: int) -> Peaks:
    """Achieved matmul TFLOP/s (square GEMM) and copy GB/s (read + write) on this device and dtype."""
    size = 8192 if device.type == "cuda" else 1536
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul = median_seconds(lambda: torch.mm(a, b), device, repeats)
    source = torch.empty(2**28 if device.type == "cuda" else 2**24, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    copy = median_seconds(lambda: target.copy_(source), device, repeats)
    return Peaks(2 * size**3 / matmul / 1e12, 2 * source.numel() * source.element_size() / copy / 1e9)


def saved_activation_bytes(run: Callable[[], torch.Tensor], excluded: list[torch.Tensor], device: torch.device) -> int:
    """Bytes kept for backward by one forward pass, beyond the ``excluded`` tensors (input and parameters)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before - output.numel() * output.element_size()
    excluded_storages = {t.untyped_storage().data_ptr() for t in excluded}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def kron_paths(layer: KronLinear | KPDLinear) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The factored, materialized and (when it can run) Triton forward of ``layer``, each plus the bias."""
    factorization = layer.factorization
    rows = factorization.rows
    if isinstance(layer, KPDLinear):
        s, a, b = factorization.s, factorization.a, factorization.b
        paths = {
            "factored": lambda x: torch_ops.kpd_matmul(x, s, a, b, rows) + layer.bias,
            "materialized": lambda x: F.linear(x, factorization.materialize(), layer.bias),
        }
        fused = ("kpd_matmul", (s, a, b))
    else:
        factors = list(factorization.factors)
        paths = {
            "factored": lambda x: torch_ops.kron_matmul(x, factors, rows) + layer.bias,
            "materialized": lambda x: F.linear(x, factorization.materialize(), layer.bias),
        }
        fused = ("kron_matmul", (factors,))
    if layer.bias.is_cuda and dispatch.triton_available():
        function = getattr(library_ops, fused[0])
        paths["triton"] = lambda x: function(x, *fused[1], rows) + layer.bias
    return paths


def useful_flops(method: str, layer: nn.Module, tokens: int) -> float:
    """Multiply-adds x 2 of forward + backward (backward = 2 x forward: input and weight gradients)."""
    in_features, out_features = layer.in_features, layer.out_features
    if method == "dense":
        return 6.0 * tokens * in_features * out_features
    factorization = layer.factorization
    (a1, b1), (a2, b2) = factorization.factor_shapes
    rank = factorization.rank
    if method == "materialized":  # build W (and its factor gradients) then two dense products
        return 6.0 * tokens * in_features * out_features + 4.0 * rank * a1 * a2 * b1 * b2
    return 6.0 * tokens * rank * a2 * b1 * (b2 + a1)


def minimal_bytes(layer: nn.Module, tokens: int, element_size: int) -> float:
    """Read x (twice: forward and weight gradient), dY (once), weights; write y, dX and weight gradients once."""
    params = sum(p.numel() for p in layer.parameters())
    return element_size * (3.0 * tokens * layer.in_features + 2.0 * tokens * layer.out_features + 3.0 * params)


def measure_row(
    label: str,
    tokens: tuple[int, int],
    method: str,
    layer: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    peaks: Peaks,
    repeats: int,
) -> Row:
    parameter = next(layer.parameters())
    device, dtype = parameter.device, parameter.dtype
    x = torch.randn(*tokens, layer.in_features, device=device, dtype=dtype, requires_grad=True)
    params = sum(p.numel() for p in layer.parameters())
    token_label = f"{tokens[0]}x{tokens[1]}"

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        forward(x).sum().backward()

    try:
        seconds = median_seconds(step, device, repeats)
        activation = saved_activation_bytes(lambda: forward(x), [x, *layer.parameters()], device)
    except (RuntimeError, ValueError) as error:  # e.g. out of memory at 64x512 on a small device
        return Row(label, token_label, method, params, None, note=f"{type(error).__name__}: {str(error)[:60]}")
    n_tokens = tokens[0] * tokens[1]
    flops = useful_flops(method.split()[-1], layer, n_tokens)
    traffic = minimal_bytes(layer, n_tokens, parameter.element_size())
    roofline_seconds = max(flops / (peaks.tflops * 1e12), traffic / (peaks.gbps * 1e9))
    return Row(
        label,
        token_label,
        method,
        params,
        seconds * 1e3,
        flops / seconds / 1e12,
        traffic / seconds / 1e9,
        roofline_seconds / seconds,
        activation / 2**20,
    )


def layer_rows(
    label: str, in_features: int, out_features: int, tokens: tuple[int, int], arguments: argparse.Namespace, peaks
) -> list[Row]:
    device, dtype = torch.device(arguments.device), getattr(torch, arguments.dtype)
    dense = nn.Linear(in_features, out_features).to(device, dtype)
    rows = [measure_row(label, tokens, "dense", dense, dense, peaks, arguments.repeats)]
    compressed = {
        f"kron r{arguments.rank}": KronLinear(in_features, out_features, rank=arguments.rank),
        f"kpd r{arguments.kpd_rank} b{arguments.kpd_block}": KPDLinear(
            in_features, out_features, rank=arguments.kpd_rank, block_size=(arguments.kpd_block,) * 2
        ),
    }
    for name, layer in compressed.items():
        layer.to(device, dtype)
        for path, forward in kron_paths(layer).items():
            rows.append(measure_row(label, tokens, f"{name} {path}", layer, forward, peaks, arguments.repeats))
    return rows


def format_table(rows: list[Row]) -> str:
    dense_ms = {(r.layer, r.tokens): r.milliseconds for r in rows if r.method == "dense"}
    header = ("layer", "tokens", "method", "params", "act MiB", "fwd+bwd ms", "/dense", "TFLOP/s", "GB/s", "roofline")
    table = [header]
    for r in rows:
        if r.milliseconds is None:
            table.append((r.layer, r.tokens, r.method, f"{r.params:,}", "-", r.note, "-", "-", "-", "-"))
            continue
        reference = dense_ms.get((r.layer, r.tokens))
        ratio = f"{r.milliseconds / reference:.2f}x" if reference else "-"
        table.append(
            (
                r.layer,
                r.tokens,
                r.method,
                f"{r.params:,}",
                f"{r.activation_mb:.1f}",
                f"{r.milliseconds:.2f}",
                ratio,
                f"{r.tflops:.3f}",
                f"{r.gbps:.1f}",
                f"{100 * r.roofline:.0f}%",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(row))

    return "\n".join([line(header), "-" * len(line(header)), *(line(row) for row in table[1:])])


MARKDOWN_HEADER = (
    "| device | dtype | layer | tokens | method | fwd+bwd ms | /dense | TFLOP/s | GB/s | roofline "
    "| peak matmul TFLOP/s | peak copy GB/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def markdown_rows(rows: list[Row], device_name: str, dtype: str, peaks: Peaks) -> str:
    """One markdown row per measurement (no header), with the device's measured peaks beside each."""
    dense_ms = {(r.layer, r.tokens): r.milliseconds for r in rows if r.method == "dense"}
    lines = []
    for r in rows:
        reference = dense_ms.get((r.layer, r.tokens))
        if r.milliseconds is None:
            cells = [r.note, "-", "-", "-", "-"]
        else:
            ratio = f"{r.milliseconds / reference:.2f}x" if reference else "-"
            cells = [f"{r.milliseconds:.3f}", ratio, f"{r.tflops:.2f}", f"{r.gbps:.0f}", f"{100 * r.roofline:.0f}%"]
        lines.append(
            f"| {device_name} | {dtype} | {r.layer} | {r.tokens} | {r.method} | {' | '.join(cells)} "
            f"| {peaks.tflops:.3g} | {peaks.gbps:.3g} |"
        )
    return "\n".join(lines) + "\n"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tokens 8x128 only and fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed steps per row (default {DEFAULT_REPEATS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--rank", type=int, default=16, help="Shapeshifter rank (default 16)")
    parser.add_argument("--kpd-rank", type=int, default=4, help="KPD rank (default 4)")
    parser.add_argument("--kpd-block", type=int, default=16, help="KPD square block size (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts N, run as 1 x N (e.g. 1,8,1024)")
    parser.add_argument("--layers", default=None, help="comma-separated layer labels to keep (default: all)")
    parser.add_argument("--markdown", default=None, help="append the rows as markdown to this file (header if empty)")
    arguments = parser.parse_args()
    arguments.repeats = arguments.repeats or (QUICK_REPEATS if arguments.quick else DEFAULT_REPEATS)
    return arguments


def main() -> None:
    arguments = parse_arguments()
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    device, dtype = torch.device(arguments.device), getattr(torch, arguments.dtype)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peaks = measure_peaks(device, dtype, arguments.repeats)
    print(f"torch {torch.__version__} | {name} | {arguments.dtype} | median of {arguments.repeats} after warm-up")
    print(f"measured peaks: matmul {peaks.tflops:.3f} TFLOP/s, copy {peaks.gbps:.1f} GB/s")
    if not (device.type == "cuda" and dispatch.triton_available()):
        print("triton column skipped: needs a CUDA device with Triton installed (on CPU Triton only runs interpreted)")
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "saved-tensor hooks"
    print(f"act MiB: memory kept for backward beyond input and parameters ({memory})")
    started = time.perf_counter()
    rows = []
    if arguments.tokens:
        token_shapes = [(1, int(count)) for count in arguments.tokens.split(",")]
    else:
        token_shapes = QUICK_TOKENS if arguments.quick else TOKENS
    layers = [size for size in LAYER_SIZES if not arguments.layers or size[0] in arguments.layers.split(",")]
    if not layers:
        raise SystemExit(f"--layers {arguments.layers!r} matches none of {[size[0] for size in LAYER_SIZES]}")
    for tokens in token_shapes:
        for label, in_features, out_features in layers:
            rows.extend(layer_rows(label, in_features, out_features, tokens, arguments, peaks))
    print(format_table(rows))
    if arguments.markdown:
        with open(arguments.markdown, "a") as handle:
            if handle.tell() == 0:
                handle.write(MARKDOWN_HEADER)
            handle.write(markdown_rows(rows, name, arguments.dtype, peaks))
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
