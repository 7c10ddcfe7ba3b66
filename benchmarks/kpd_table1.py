"""Zhu et al., Table 1 in shape: one linear layer, rank-2 KPD with block sizes (2,2), (4,2), (8,2), (16,2).

The paper trains a softmax linear layer on MNIST; MNIST cannot be downloaded here, so this uses
scikit-learn's offline ``load_digits`` (8x8 images, 64 features, 10 classes; 1,347 train / 450 test
images). For each block size it trains, with the same optimizer budget:

- **Ours (KPD)**: ``W = sum_i (S ⊙ A_i) ⊗ B_i`` with rank 2, Adam, and ``kt.kpd.proximal_step(..., optimizer=)``
  on ``S`` after every step (eq. 4 solved by proximal gradient in Adam's metric, so blocks reach exact zeros and
  ``--l1`` is eq. 4's lambda);
- **Group LASSO**: a dense ``W`` with the block-group penalty applied by its proximal operator;
- a **dense** baseline once.

Columns follow the paper: accuracy, sparsity rate (share of zero blocks, counted with ``abs``),
training parameters, training FLOPs per sample (forward + backward, Zhu et al., Proposition 2).
Block sizes are given as in the paper, (rows of the in x out weight, columns); internally the
weight is ``out x in``. Run: ``pip install scikit-learn && python benchmarks/kpd_table1.py``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import kron_transformers as kt


PAPER_BLOCKS = [(2, 2), (4, 2), (8, 2), (16, 2)]  # (in, out) orientation as printed in Table 1


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_train, x_test, y_train, y_test


def train(model: nn.Module, data, epochs: int, after_step) -> float:
    x_train, x_test, y_train, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(x_train), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
            after_step(model, optimizer)
    with torch.no_grad():
        return float((model(x_test).argmax(-1) == y_test).float().mean())


@torch.no_grad()
def group_lasso_step(weight: torch.Tensor, block: tuple[int, int], threshold: float) -> None:
    """Proximal operator of ``threshold * sum_g ||W_g||_F`` over ``block``-sized groups (scale each block)."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows // block[0], block[0], cols // block[1], block[1])
    norms = blocks.pow(2).sum(dim=(1, 3), keepdim=True).sqrt()
    blocks.mul_((1 - threshold / norms.clamp_min(1e-12)).clamp_min(0))


def block_sparsity(weight: torch.Tensor, block: tuple[int, int]) -> float:
    rows, cols = weight.shape
    blocks = weight.reshape(rows // block[0], block[0], cols // block[1], block[1]).abs().sum(dim=(1, 3))
    return float((blocks == 0).float().mean())


def run(seeds: int, epochs: int, l1: float, group: float) -> list[tuple]:
    rows = []
    dense_accuracy = []
    results: dict[tuple, dict[str, list]] = {}
    for seed in range(seeds):
        data = load_data(seed)
        torch.manual_seed(seed)
        dense_accuracy.append(train(nn.Linear(64, 10), data, epochs, lambda model, optimizer: None))
        for block_in, block_out in PAPER_BLOCKS:
            block = (block_out, block_in)  # out x in weight
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(64, 10))
            kt.compress_model(
                model, kt.KronConfig(default=kt.KPD(rank=2, block_size=block), target_modules=["0"], init="random")
            )
            accuracy = train(model, data, epochs, lambda m, adam: kt.kpd.proximal_step(m, 1e-2, l1, optimizer=adam))
            (report,) = kt.kpd.layer_report(model)
            entry = results.setdefault(("Ours (KPD r=2)", block_in, block_out), {"acc": [], "sparsity": []})
            entry["acc"].append(accuracy)
            entry["sparsity"].append(report.sparsity)
            entry["params"], entry["flops"] = report.training_parameters, report.training_flops

            torch.manual_seed(seed)
            dense = nn.Linear(64, 10)
            accuracy = train(dense, data, epochs, lambda m, adam: group_lasso_step(m.weight, block, 1e-2 * group))
            entry = results.setdefault(("Group LASSO", block_in, block_out), {"acc": [], "sparsity": []})
            entry["acc"].append(accuracy)
            entry["sparsity"].append(block_sparsity(dense.weight.detach(), block))
            entry["params"], entry["flops"] = 64 * 10 + 10, kt.kpd.dense_training_flops(10, 64)
    rows.append(("-", "Dense", _mean_std(dense_accuracy), "0.00", 650, kt.kpd.dense_training_flops(10, 64)))
    for (method, block_in, block_out), entry in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        sparsity = _mean_std(entry["sparsity"])
        rows.append(
            (f"({block_in},{block_out})", method, _mean_std(entry["acc"]), sparsity, entry["params"], entry["flops"])
        )
    return rows


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs per row (the paper reports 5)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--l1", type=float, default=1e-2, help="eq. 4's lambda on ||S||_1 (Adam-metric proximal step)")
    parser.add_argument("--group", type=float, default=1.0, help="group LASSO strength (x lr)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = ("block size", "model", "accuracy %", "sparsity %", "training params", "training FLOPs/sample")
    table = [header] + [tuple(str(cell) for cell in row) for row in run(args.seeds, args.epochs, args.l1, args.group)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"load_digits, {args.seeds} seeds, {args.epochs} epochs, Adam lr 1e-2, l1 {args.l1}, group {args.group}")
    for index, row in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    main()
