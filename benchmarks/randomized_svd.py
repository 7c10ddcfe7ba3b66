"""The SVD init's randomized path against the exact SVD: time and Frobenius error, at a 2B Llama's Shapeshifter shapes.

``truncated_svd_factors`` takes ``decompositions.randomized_svd`` for a large rearranged matrix whose rank is small
against its dimensions. At Shapeshifter's balanced factor shapes a 2560 x 2560 attention weight rearranges to
2560 x 2560 and a 6912 x 2560 FFN weight to 4096 x 4320. Per matrix and rank: seconds of the exact
``torch.linalg.svd`` (what the init used before) and of the randomized SVD, and how much larger the randomized
truncation's Frobenius error is than the optimum (Eckart-Young), on a Gaussian matrix (a flat spectrum, the hard
case for a randomized range finder, and what a randomly initialized checkpoint holds) and on singular values 1/k.

    python benchmarks/randomized_svd.py
"""

from __future__ import annotations

import time

import torch

from kron_transformers.factorizations.decompositions import randomized_svd


CASES = [((2560, 2560), "gaussian"), ((2560, 2560), "1/k"), ((4096, 4320), "gaussian")]
RANKS = (8, 64)


def matrix(shape: tuple[int, int], spectrum: str, generator: torch.Generator) -> torch.Tensor:
    if spectrum == "gaussian":
        return 0.02 * torch.randn(*shape, dtype=torch.float64, generator=generator)
    rows, cols = shape
    left = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, cols, dtype=torch.float64, generator=generator)).Q
    return (left / torch.arange(1, cols + 1, dtype=torch.float64)) @ right.T


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    print("| rearranged matrix | spectrum | rank | exact SVD (s) | randomized (s) | error / optimal error - 1 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for shape, spectrum in CASES:
        weight = matrix(shape, spectrum, generator)
        start = time.perf_counter()
        singular_values = torch.linalg.svd(weight, full_matrices=False).S
        exact_seconds = time.perf_counter() - start
        for rank in RANKS:
            start = time.perf_counter()
            u, s, vh = randomized_svd(weight, rank)
            seconds = time.perf_counter() - start
            excess = float((weight - (u * s) @ vh).norm() / singular_values[rank:].norm() - 1)
            print(
                f"| {shape[0]} x {shape[1]} | {spectrum} | {rank} | {exact_seconds:.1f} | {seconds:.2f} "
                f"| {excess:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
