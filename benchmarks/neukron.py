"""NeuKron (Kwon et al.) vs truncated SVD at equal parameter counts, and per-entry inference time (supplement Fig. 13).

Error measure (both methods): relative Frobenius error ``||X - Y||_F / ||X||_F``, next to the paper's
approximation error ``||X - Y||_F^2``. NeuKron's error is computed exactly in ``O(nnz)``
(``NeuKron.approximation_error``); the rank-R SVD error is ``||X||^2 - sum_{i<=R} sigma_i^2``, exact for
the singular triplets that ``scipy.sparse.linalg.svds`` returns.

Parameter counts: SVD rank R stores ``R (N + M + 1)`` numbers; NeuKron gets the largest hidden size whose
model has at most as many parameters. NeuKron's learned orders (one integer per row and column) are
stored as well and are listed separately, as in the paper's "constant-size" model.

Matrices:

- ``powerlaw``: a synthetic bipartite graph (Chung-Lu: rows and columns drawn with power-law
  weights ``(i + 1)^-0.9``), binary entries;
- ``multi30k``: word co-occurrence counts (same sentence, at most ``--window`` words apart, both
  directions) among the ``--vocab`` most frequent lower-cased words of Multi30k's English training
  captions (``train.en.gz`` under ``--multi30k``; skipped with a message when the option is not given, an error
  when the folder lacks the file).

Run: ``python benchmarks/neukron.py [--multi30k DATA/multi30k]``. The machine this was written on is shared and
loaded; times are indicative, compare ratios within one run.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import math
import os
import re
import time

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.linalg import svds

from kron_transformers.neukron import NeuKron


def powerlaw_bipartite(rows: int, cols: int, edges: int, exponent: float, seed: int) -> scipy.sparse.csr_matrix:
    """Chung-Lu bipartite graph: each edge picks a row and a column with probability ~ (index + 1)^-exponent."""
    rng = np.random.default_rng(seed)
    row_weights = (np.arange(rows) + 1.0) ** -exponent
    col_weights = (np.arange(cols) + 1.0) ** -exponent
    sampled_rows = rng.choice(rows, size=edges, p=row_weights / row_weights.sum())
    sampled_cols = rng.choice(cols, size=edges, p=col_weights / col_weights.sum())
    matrix = scipy.sparse.coo_matrix((np.ones(edges), (sampled_rows, sampled_cols)), shape=(rows, cols)).tocsr()
    matrix.data[:] = 1.0
    return matrix


def multi30k_cooccurrence(folder: str, vocab_size: int, window: int) -> scipy.sparse.csr_matrix:
    """Symmetric word co-occurrence counts over Multi30k's English training captions."""
    with gzip.open(os.path.join(folder, "train.en.gz"), "rt", encoding="utf-8") as handle:
        sentences = [re.findall(r"[a-z]+", line.lower()) for line in handle]
    counts = collections.Counter(word for sentence in sentences for word in sentence)
    vocab = {word: index for index, (word, _) in enumerate(counts.most_common(vocab_size))}
    rows, cols = [], []
    for sentence in sentences:
        ids = [vocab.get(word, -1) for word in sentence]
        for first, a in enumerate(ids):
            for b in ids[first + 1 : first + 1 + window]:
                if a >= 0 and b >= 0:
                    rows += [a, b]
                    cols += [b, a]
    shape = (len(vocab), len(vocab))
    return scipy.sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=shape).tocsr()


def svd_error(matrix: scipy.sparse.csr_matrix, rank: int) -> float:
    singular = svds(matrix, k=rank, return_singular_vectors=False, random_state=0)
    return max(float(matrix.power(2).sum()) - float(np.square(singular).sum()), 0.0)


def neukron_parameters(hidden_size: int, shape: tuple[int, int]) -> int:
    one_entry = (torch.tensor([[0], [0]]), torch.ones(1), shape)
    return NeuKron(hidden_size).fit(one_entry, epochs=0).num_parameters()


def largest_hidden_size(budget: int, shape: tuple[int, int]) -> int:
    hidden = 1
    while neukron_parameters(hidden + 1, shape) <= budget:
        hidden += 1
    return hidden


def compare(name: str, matrix: scipy.sparse.csr_matrix, ranks: list[int], args: argparse.Namespace) -> list[str]:
    rows, cols = matrix.shape
    squared_norm = float(matrix.power(2).sum())
    lines = []
    for rank in ranks:
        budget = rank * (rows + cols + 1)
        start = time.perf_counter()
        svd = svd_error(matrix, rank)
        svd_time = time.perf_counter() - start
        hidden = largest_hidden_size(budget, matrix.shape)
        start = time.perf_counter()
        compressor = NeuKron(hidden, seed=args.seed).fit(
            matrix,
            epochs=args.epochs,
            lr=args.lr,
            gamma=args.gamma,
            reorder_passes=args.reorder_passes,
            steps_per_epoch=args.steps_per_epoch,
        )
        fit_time = time.perf_counter() - start
        neukron = compressor.approximation_error()
        nnz = f"{matrix.nnz:,}"
        size = f"{rows}x{cols}"
        lines.append(
            f"| {name} | {size} | {nnz} | T-SVD rank {rank} | {budget:,} | - "
            f"| {math.sqrt(svd / squared_norm):.4f} | {svd:.4g} | {svd_time:.1f} |"
        )
        lines.append(
            f"| {name} | {size} | {nnz} | NeuKron h={hidden} | {compressor.num_parameters():,} | {rows + cols:,} "
            f"| {math.sqrt(neukron / squared_norm):.4f} | {neukron:.4g} | {fit_time:.1f} |"
        )
        print(lines[-2], lines[-1], sep="\n", flush=True)
    return lines


def inference_times(args: argparse.Namespace) -> list[str]:
    """Supplementary Figure 13: mean per-entry time of ``predict`` on random entries of n x n matrices."""
    lines = []
    generator = torch.Generator().manual_seed(args.seed)
    for log_size in args.log_sizes:
        size = 2**log_size
        compressor = NeuKron(args.timing_hidden).fit((torch.tensor([[0], [0]]), torch.ones(1), (size, size)), 0)
        rows = torch.randint(0, size, (args.entries,), generator=generator)
        cols = torch.randint(0, size, (args.entries,), generator=generator)
        compressor.predict(rows[:1000], cols[:1000])  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compressor.predict(rows, cols)
            times.append(time.perf_counter() - start)
        per_entry = 1e6 * sum(times) / len(times) / args.entries
        lines.append(f"| {log_size} | {compressor.layout.num_levels} | {per_entry:.3f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--multi30k", help="folder with Multi30k's train.en.gz (omitted: that matrix is skipped)")
    parser.add_argument("--vocab", type=int, default=500, help="co-occurrence vocabulary (most frequent words)")
    parser.add_argument("--window", type=int, default=2, help="co-occurrence window in words")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4], help="SVD ranks (set the parameter budgets)")
    parser.add_argument("--epochs", type=int, default=60, help="NeuKron epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=16, help="1 = the paper's full-batch step")
    parser.add_argument("--reorder-passes", type=int, default=1, help="swap passes per mode and epoch")
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--gamma", type=float, default=math.inf, help="swap acceptance; inf = hill climbing")
    parser.add_argument("--log-sizes", type=int, nargs="+", default=[7, 10, 13, 16, 19])
    parser.add_argument("--entries", type=int, default=100_000, help="random entries timed per size (paper: 1e6)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per size (paper: 5)")
    parser.add_argument("--timing-hidden", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (small models: 1 is fastest)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.multi30k is not None and not os.path.isfile(os.path.join(args.multi30k, "train.en.gz")):
        parser.error(f"--multi30k {args.multi30k}: no train.en.gz there (give the folder holding Multi30k's files)")
    torch.set_num_threads(args.threads)

    header = [
        "| matrix | shape | nnz | method | parameters | + order entries | rel. Frobenius error | squared error "
        "| fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    lines = compare("powerlaw", powerlaw_bipartite(1500, 1000, 15_000, 0.9, args.seed), args.ranks, args)
    if args.multi30k is not None:
        cooccurrence = multi30k_cooccurrence(args.multi30k, args.vocab, args.window)
        lines += compare("multi30k co-occurrence", cooccurrence, args.ranks, args)
    else:
        print("(multi30k skipped: pass --multi30k DATA/multi30k to include it)")

    timing_header = ["| log2 rows = log2 cols | levels | us per entry |", "|---|---|---|"]
    print("\n" + "\n".join(timing_header), flush=True)
    timing = inference_times(args)

    print("\nSummary\n")
    print("\n".join(header + lines))
    print()
    print("\n".join(timing_header + timing))


if __name__ == "__main__":
    main()
