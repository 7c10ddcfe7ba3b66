"""Which backend ``auto`` should pick: every dispatched op timed with ``KRON_TRANSFORMERS_BACKEND=torch`` and
``=triton`` on the same arguments, forward alone and forward + backward, in one process.

The ops are the ones ``kernels/ops.py`` registers, called directly with factors taken from the library's own
modules at T5-small / BERT-base sizes: ``kron_matmul`` (Shapeshifter r16, 512 -> 2048), ``kpd_matmul`` (KPD r4,
4x4 blocks, 768 -> 3072), ``block_sparse_matmul`` (768 -> 3072, half of the 16x16 blocks zero),
``kron_gather_rows`` (word2ketXS r10 over a 32128 x 512 table, order 2 and 3), ``tt_gather_rows`` (TT ranks 16,
same table) and ``tt_embedding_bag`` (10^6 x 64, TT ranks 16, bags of 10). Each round runs every backend of an
op once, in an order rotated from round to round; a row reports the median time and the median over rounds of
its time over the ``torch`` time in the same round (``triton/torch`` < 1: the kernel is faster).

Run from the repository root::

    python benchmarks/backend_speed.py                      # on a GPU (bf16 by default)
    python benchmarks/backend_speed.py --dtype float32 --tokens 1024,32768
    TRITON_INTERPRET=1 python benchmarks/backend_speed.py --device cpu --smoke   # checks the script, no timing
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from kernel_speed import synchronize

import kron_transformers as kt
from kron_transformers import kernels
from kron_transformers.kernels import dispatch


BACKENDS = ("torch", "triton")


def op_cases(tokens: int, dtype: torch.dtype, device: torch.device, smoke: bool) -> dict[str, Callable]:
    """name -> (function of ``grad``: runs the op, backward too when ``grad``); sizes shrink with ``smoke``."""
    vocab, width, hidden, ffn = (300, 16, 32, 64) if smoke else (32128, 512, 768, 3072)
    generator = torch.Generator().manual_seed(0)

    def prepare(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.detach().to(device, dtype).requires_grad_() for t in tensors]

    shapeshifter = kt.KronLinear(width, 4 * width, rank=16)
    kpd = kt.KPDLinear(hidden, ffn, rank=4, block_size=(4, 4))
    with torch.no_grad():
        kpd.factorization.s.normal_()
    block_mask = (torch.rand(ffn // 16, hidden // 16, generator=generator) < 0.5).float()
    sparse_weight = torch.randn(ffn, hidden, generator=generator) * block_mask.repeat_interleave(
        16, 0
    ).repeat_interleave(16, 1)
    block_sparse = kt.BlockSparseLinear.from_dense(sparse_weight, (16, 16), None)
    word2ketxs = {order: kt.KronEmbedding(vocab, width, rank=10, order=order) for order in (2, 3)}
    tensor_train = kt.TTEmbedding(vocab, width, tt_ranks=16)
    bag_rows, bag_width, bag_size = (500, 8, 10) if smoke else (10**6, 64, 10)
    tensor_train_bag = kt.TTEmbeddingBag(bag_rows, bag_width, tt_ranks=16, mode="sum")

    x_small = torch.randn(tokens, width, generator=generator)
    x_hidden = torch.randn(tokens, hidden, generator=generator)
    ids = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    bag_ids = torch.randint(0, bag_rows, (tokens * bag_size,), generator=generator).to(device)
    offsets = torch.arange(0, tokens * bag_size, bag_size).to(device)

    def with_grad(run: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[bool], None]:
        def step(backward: bool) -> None:
            if not backward:
                with torch.no_grad():
                    run()
                return
            output = run()
            torch.autograd.grad(output, inputs, torch.ones_like(output))

        return step

    cases = {}
    inputs = prepare(x_small, *shapeshifter.factorization.factors)
    cases["kron_matmul Shapeshifter r16 512->2048"] = with_grad(
        lambda inputs=inputs: kernels.kron_matmul(inputs[0], inputs[1:], 4 * width), inputs
    )
    kpd_inputs = prepare(x_hidden, kpd.factorization.s, kpd.factorization.a, kpd.factorization.b)
    cases["kpd_matmul KPD r4 4x4 768->3072"] = with_grad(lambda: kernels.kpd_matmul(*kpd_inputs, ffn), kpd_inputs)
    sparse_inputs = prepare(x_hidden, block_sparse.values)
    cases["block_sparse_matmul 768->3072 half the blocks"] = with_grad(
        lambda: kernels.block_sparse_matmul(
            sparse_inputs[0],
            sparse_inputs[1],
            block_sparse.crow_indices.to(device),
            block_sparse.col_indices.to(device),
            ffn,
        ),
        sparse_inputs,
    )
    for order, embedding in word2ketxs.items():
        factors = prepare(*embedding.factorization.factors)
        cases[f"kron_gather_rows word2ketXS order {order} r10"] = with_grad(
            lambda factors=factors: kernels.kron_gather_rows(ids, factors, width), factors
        )
    cores = prepare(*tensor_train.factorization.cores)
    cases["tt_gather_rows TT r16"] = with_grad(lambda: kernels.tt_gather_rows(ids, cores, width), cores)
    bag_cores = prepare(*tensor_train_bag.factorization.cores)
    cases["tt_embedding_bag TT r16 bags of 10"] = with_grad(
        lambda: kernels.tt_embedding_bag(bag_ids, offsets, None, bag_cores, bag_width, "sum"), bag_cores
    )
    return cases


def timed(step: Callable[[bool], None], backend: str, backward: bool, device: torch.device) -> float:
    os.environ[dispatch.BACKEND_ENV] = backend
    synchronize(device)
    start = time.perf_counter()
    step(backward)
    synchronize(device)
    return time.perf_counter() - start


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--tokens", default="1024,32768", help="comma-separated rows / ids / bags per call")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds after two warm-up rounds")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, 1 round: checks the script, times nothing")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    device, dtype = torch.device(arguments.device), getattr(torch, arguments.dtype)
    rounds = 1 if arguments.smoke else arguments.rounds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} | {name} | {arguments.dtype} | median of {rounds} rounds after 2 warm-up")
    header = f"{'op':<46} {'tokens':>6} {'pass':<8} {'torch ms':>9} {'triton ms':>10} {'triton/torch':>13}"
    print(header + "\n" + "-" * len(header))
    for tokens in (int(count) for count in arguments.tokens.split(",")):
        for label, step in op_cases(tokens, dtype, device, arguments.smoke).items():
            for backward in (False, True):
                seconds: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
                for round_index in range(rounds + 2):
                    order = BACKENDS[round_index % 2 :] + BACKENDS[: round_index % 2]
                    times = {backend: timed(step, backend, backward, device) for backend in order}
                    if round_index >= 2:
                        for backend in BACKENDS:
                            seconds[backend].append(times[backend])
                ratio = statistics.median(t / s for t, s in zip(seconds["triton"], seconds["torch"]))
                print(
                    f"{label:<46} {tokens:>6} {'fwd+bwd' if backward else 'fwd':<8} "
                    f"{1e3 * statistics.median(seconds['torch']):>9.3f} "
                    f"{1e3 * statistics.median(seconds['triton']):>10.3f} {ratio:>12.2f}x"
                )
    os.environ.pop(dispatch.BACKEND_ENV, None)


if __name__ == "__main__":
    main()
