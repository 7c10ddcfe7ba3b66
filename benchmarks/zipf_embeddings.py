"""Compressed embedding bags on a synthetic Zipf click-prediction task, at equal parameter budgets.

Each sample is a bag of ids drawn from a Zipf distribution over a ``--rows`` vocabulary; its
label is Bernoulli(sigmoid(w . mean(E*[bag]))) for a hidden table ``E*`` whose rows are one of
a few hundred category centres plus per-id noise (items with categories, the structure CCE's
clustering looks for, Tsang & Ahle). Every method trains ``EmbeddingBag(mean) -> Linear(dim, 1)``
with Adam for the same steps on the same stream, then is scored on held-out samples:

- dense ``nn.EmbeddingBag`` at full size (the reference point, not at the budget),
- the hashing trick (``nn.EmbeddingBag`` of ``budget / dim`` rows, universal hash of the id),
- TT-Rec without and with its LFU cache (``TTEmbeddingBag``, the largest rank that fits the budget;
  the cache rows count against it and take a quarter of it; skipped with a note when
  ``kron_transformers.modules.tensor_train`` is not available),
- CCE with random pointers, and CCE clustered twice (at 25% and 50% of the steps, Tsang & Ahle's
  "cluster early, then let the model rest").

```
python benchmarks/zipf_embeddings.py --quick
python benchmarks/zipf_embeddings.py --rows 1000000 --steps 2000 --batch 512 --budget 16000
```

Columns: BCE and AUC on the held-out set (the hidden model's own BCE is printed as the floor),
trainable parameters of the table, bytes of its non-trainable buffers (CCE's int32 pointers),
mean wall time of a training step (clustering excluded, shown separately). Timings are CPU
wall times and noisy on a shared machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

import kron_transformers as kt
from kron_transformers.factorizations.cce import MERSENNE_PRIME


try:
    from kron_transformers.modules.tensor_train import TTEmbeddingBag
except ImportError as error:  # written in parallel; the TT rows appear once it is merged
    TTEmbeddingBag, TT_IMPORT_ERROR = None, error
else:
    TT_IMPORT_ERROR = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10**6, help="vocabulary size of the table")
    parser.add_argument("--dim", type=int, default=16, help="embedding dimension")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per method")
    parser.add_argument("--batch", type=int, default=512, help="samples per step")
    parser.add_argument("--bag", type=int, default=10, help="ids per sample")
    parser.add_argument("--budget", type=int, default=None, help="parameters per compressed table (rows*dim/1000)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the id distribution")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--eval", type=int, default=20000, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small run: 10^5 rows, 300 steps, batch 256")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.steps, args.batch, args.eval = 10**5, 300, 256, 10000
    if args.budget is None:
        args.budget = max(args.rows * args.dim // 1000, 8 * args.dim)
    return args


class ZipfTask:
    """Bags of Zipf-distributed ids (ranks shuffled over the vocabulary) and planted logistic labels."""

    def __init__(self, rows: int, dim: int, bag: int, exponent: float, seed: int, categories: int = 256) -> None:
        generator = torch.Generator().manual_seed(seed)
        weights = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** exponent
        self.cdf = (weights.cumsum(0) / weights.sum()).float()
        self.id_of_rank = torch.randperm(rows, generator=generator)
        centres = torch.randn(categories, dim, generator=generator)
        category = torch.randint(0, categories, (rows,), generator=generator)
        self.hidden = centres[category] + 0.5 * torch.randn(rows, dim, generator=generator)
        self.direction = torch.randn(dim, generator=generator) / math.sqrt(dim)
        self.bag = bag
        self.generator = generator

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids (batch, bag), labels, true logits)``."""
        ranks = torch.searchsorted(self.cdf, torch.rand(batch, self.bag, generator=self.generator))
        ids = self.id_of_rank[ranks.clamp_max(len(self.cdf) - 1)]
        logits = 6.0 * self.hidden[ids].mean(1) @ self.direction
        labels = torch.bernoulli(torch.sigmoid(logits), generator=self.generator)
        return ids, labels, logits


class HashedBag(nn.Module):
    """The hashing trick: a small ``nn.EmbeddingBag`` indexed by a universal hash of the id."""

    def __init__(self, num_embeddings: int, embedding_dim: int, buckets: int, seed: int = 0) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(buckets, embedding_dim, mode="mean")
        self.num_embeddings, self.embedding_dim, self.buckets = num_embeddings, embedding_dim, buckets
        rng = random.Random(seed)
        self.a, self.b = rng.randrange(1, MERSENNE_PRIME), rng.randrange(0, MERSENNE_PRIME)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(((self.a * ids + self.b) % MERSENNE_PRIME) % self.buckets)

    def num_parameters(self) -> int:
        return self.bag.weight.numel()


def tt_bag(rows: int, dim: int, budget: int, cache_fraction: float):
    """The largest TT rank whose table fits the budget."""
    best = None
    for rank in range(1, 129):
        candidate = TTEmbeddingBag(rows, dim, tt_ranks=rank, cache_fraction=cache_fraction, mode="mean")
        if candidate.num_parameters() > budget:
            break
        best = candidate
    return best


def build_methods(args: argparse.Namespace) -> list[tuple[str, nn.Module, list[int]]]:
    """``(name, embedding bag, clustering steps)`` per method."""
    rows, dim, budget = args.rows, args.dim, args.budget
    table_rows = max(1, budget // (2 * dim))
    dense = nn.EmbeddingBag(rows, dim, mode="mean")
    methods = [
        ("dense EmbeddingBag", dense, []),
        ("hashing trick", HashedBag(rows, dim, budget // dim, args.seed), []),
    ]
    if TTEmbeddingBag is None:
        print(f"note: TT-Rec rows skipped (kron_transformers.modules.tensor_train unavailable: {TT_IMPORT_ERROR})")
    else:
        cache_fraction = args.budget / (4 * rows * dim)  # the cache takes a quarter of the budget
        for name, fraction in (("TT-Rec", 0.0), (f"TT-Rec + cache {100 * cache_fraction:.3g}%", cache_fraction)):
            module = tt_bag(rows, dim, budget, fraction)
            if module is None:
                print(f"note: {name} skipped: even TT rank 1 exceeds the budget of {budget} parameters")
            else:
                methods.append((name, module, []))
    methods.append(("CCE (random pointers)", kt.CCEEmbeddingBag(rows, dim, table_rows=table_rows, seed=args.seed), []))
    clustered = kt.CCEEmbeddingBag(rows, dim, table_rows=table_rows, seed=args.seed)
    methods.append(("CCE + clustering x2", clustered, [args.steps // 4, args.steps // 2]))
    with torch.no_grad():  # one start scale for every table: entries N(0, 0.1^2)
        for _, module, _ in methods:
            if isinstance(module, kt.CCEEmbeddingBag):
                module.factorization.reset_random(0.1)
            elif isinstance(module, (nn.EmbeddingBag, HashedBag)):
                next(module.parameters()).normal_(0.0, 0.1)
    return methods


def table_parameters(module: nn.Module) -> int:
    if isinstance(module, nn.EmbeddingBag):
        return module.weight.numel()
    return module.num_parameters()


def buffer_bytes(module: nn.Module) -> int:
    return sum(buffer.numel() * buffer.element_size() for buffer in module.buffers())


def train_and_score(
    name: str, embedding: nn.Module, cluster_steps: list[int], args: argparse.Namespace, batches, held_out
) -> dict[str, float | str]:
    torch.manual_seed(args.seed)
    model = nn.Sequential(embedding, nn.Linear(args.dim, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if cluster_steps:
        kt.cce.schedule_clustering(model, kt.cce.ClusterSchedule(steps=cluster_steps), seed=args.seed)
    step_time = cluster_time = 0.0
    metrics: dict[str, float] = {}
    for step, (ids, labels, _) in enumerate(batches, start=1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(ids).squeeze(-1), labels)
        loss.backward()
        optimizer.step()
        middle = time.perf_counter()
        metrics.update(kt.on_train_step(model, step, optimizer))  # CCE clustering when scheduled
        step_time += middle - start
        cluster_time += time.perf_counter() - middle
    ids, labels, _ = held_out
    with torch.no_grad():
        logits = torch.cat([model(chunk).squeeze(-1) for chunk in ids.split(4096)])
    entropy = f"H1 {metrics['0.h1']:.2f}, H2 {metrics['0.h2']:.2f}" if "0.h1" in metrics else ""
    return {
        "method": name,
        "BCE": float(F.binary_cross_entropy_with_logits(logits, labels)),
        "AUC": float(roc_auc_score(labels.numpy(), logits.numpy())),
        "parameters": table_parameters(embedding),
        "buffer bytes": buffer_bytes(embedding),
        "ms/step": 1000 * step_time / len(batches),
        "clustering s": cluster_time,
        "entropies": entropy,
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    task = ZipfTask(args.rows, args.dim, args.bag, args.zipf, args.seed)
    batches = [task.sample(args.batch) for _ in range(args.steps)]
    held_out = task.sample(args.eval)
    floor = float(F.binary_cross_entropy_with_logits(held_out[2], held_out[1]))
    seen = torch.cat([ids.reshape(-1) for ids, _, _ in batches]).unique().numel()
    print(
        f"Zipf({args.zipf}) click task: {args.rows:,} x {args.dim} table, bags of {args.bag}, {args.steps} steps x "
        f"{args.batch}, Adam lr {args.lr}, budget {args.budget:,} parameters per compressed table "
        f"({args.rows * args.dim / args.budget:.0f}x), {seen:,} distinct ids seen in training"
    )
    print(
        f"hidden model's own held-out BCE (the floor): {floor:.4f}; AUC {roc_auc_score(held_out[1], held_out[2]):.4f}"
    )
    results = [train_and_score(*method, args, batches, held_out) for method in build_methods(args)]
    header = list(results[0])
    cells = [
        [
            f"{value:.4f}"
            if key in ("BCE", "AUC")
            else f"{value:,}"
            if isinstance(value, int)
            else f"{value:.1f}"
            if isinstance(value, float)
            else value
            for key, value in row.items()
        ]
        for row in results
    ]
    widths = [max(len(header[i]), *(len(row[i]) for row in cells)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
