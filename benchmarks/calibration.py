"""Calibrated vs svd initialization on a pretrained encoder: cosine of sentence embeddings against the dense model.

Given a folder holding any Hugging Face encoder checkpoint (with its tokenizer) and a text file (one
sentence a line), every encoder linear (attention and FFN roles) is compressed at each ratio with each
method and each initialization, then the mean-pooled sentence embeddings are compared with the dense
model's by cosine similarity (mean over sentences). ``calibrated+distill`` continues the calibrated model
with ``kt.distill`` for ``--distill-steps`` steps on the same text (hidden-state matching). One run, one table.

    python benchmarks/calibration.py --model DIR --text sentences.txt [--ratios 2 4 8] [--distill-steps 50]

Calibration uses the first ``--calibration`` sentences; the cosine is measured on the last ``--eval`` ones.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

import kron_transformers as kt


METHODS = {"Shapeshifter": kt.Shapeshifter, "LowRank": kt.LowRank}


def batches(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> list[dict]:
    return [
        dict(
            tokenizer(
                sentences[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(sentences), batch_size)
    ]


@torch.no_grad()
def sentence_embeddings(model, encoded: list[dict]) -> torch.Tensor:
    model.eval()
    pooled = []
    for batch in encoded:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(pooled)


def run(args: argparse.Namespace) -> list[tuple[str, ...]]:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModel.from_pretrained(args.model).eval()
    lines = [line.strip() for line in Path(args.text).read_text("utf-8").splitlines() if line.strip()]
    calibration = batches(tokenizer, lines[: args.calibration], args.batch_size, args.max_length)
    evaluation = batches(tokenizer, lines[-args.eval :], args.batch_size, args.max_length)
    reference = sentence_embeddings(dense, evaluation)
    stats = kt.calibrate(dense, calibration)
    rows = []
    for ratio in args.ratios:
        for method, spec_class in METHODS.items():
            for init in ("svd", "calibrated"):
                start = time.perf_counter()
                spec = spec_class(compression=ratio)
                config = kt.KronConfig(attention=spec, ffn=spec, init=init)
                model = kt.compress_model(
                    copy.deepcopy(dense), config, calibration_data=stats if init != "svd" else None
                )
                report = kt.report(model)
                cosine = torch.cosine_similarity(sentence_embeddings(model, evaluation), reference).mean()
                rows.append(
                    (
                        f"{ratio}x",
                        method,
                        init,
                        f"{report.ratio:.2f}x",
                        f"{cosine:.4f}",
                        f"{time.perf_counter() - start:.1f}",
                    )
                )
                if init == "calibrated" and args.distill_steps:
                    start = time.perf_counter()
                    kt.distill(
                        model, dense, calibration, steps=args.distill_steps, lr=args.distill_lr, logit_weight=0.0
                    )
                    cosine = torch.cosine_similarity(sentence_embeddings(model, evaluation), reference).mean()
                    rows.append(
                        (
                            f"{ratio}x",
                            method,
                            f"calibrated+distill({args.distill_steps})",
                            f"{report.ratio:.2f}x",
                            f"{cosine:.4f}",
                            f"{time.perf_counter() - start:.1f}",
                        )
                    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder of an HF encoder checkpoint with its tokenizer")
    parser.add_argument("--text", required=True, help="text file, one sentence a line")
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8], help="per-matrix compression ratios")
    parser.add_argument("--calibration", type=int, default=256, help="sentences used for calibration/distillation")
    parser.add_argument("--eval", type=int, default=256, help="sentences used for the cosine")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--distill-steps", type=int, default=50)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    args = parser.parse_args(argv)
    header = ("ratio", "method", "init", "model ratio", "cosine vs dense", "seconds")
    table = [header] + run(args)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"{args.model}: encoder linears compressed; mean cosine of mean-pooled embeddings on {args.eval} sentences")
    for index, row in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    main()
