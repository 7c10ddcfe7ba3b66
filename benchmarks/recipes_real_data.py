"""The recipes on real data under a fixed CPU budget: dense vs Shapeshifter vs LowRank on Multi30k De-En, dense vs
KPD on a CIFAR-10 split. Every model is trained from scratch for ``--seconds`` of training time, then evaluated.

    python benchmarks/recipes_real_data.py DATA [--seconds 90] [--output-dir /tmp/recipes_bench]

DATA holds ``multi30k/{train,val,test_2016_flickr}.{de,en}.gz`` and ``cifar10/test_images.npz`` (the project's
shared benchmark data; a fresh clone lacks it, and the script then stops with an error naming what is missing).

- Multi30k: a T5 (d_model 256, 3+3 layers) compressed with Shapeshifter (Panahi, section 4.3; embedding rank
  32, attention and feed-forward rank 8), the same T5 with LowRank at the same per-role parameter ratios (the
  largest ranks that do not exceed them), and a dense T5 narrowed to about the same parameter count. One shared
  BPE vocabulary of 4,000 tokens trained on the training set. BLEU (sacreBLEU) on all of test_2016_flickr, greedy.
  (the run name "dense (narrow)": the dense model is narrower, so that all three have about the same parameters)
- CIFAR-10: the 10,000 test images (sorted by class) shuffled with seed 0 and split 9,000 train / 1,000 test;
  a ViT (32x32, patch 4, d 128, 4 layers) dense and with KPD rank 4, 4x4 blocks (Zhu et al., eq. 3) plus the l1
  proximal step on S (eq. 4). Top-1 accuracy.

One table: parameters, metric, optimizer steps reached, training and total wall time per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoConfig, AutoModelForSeq2SeqLM
from transformers.utils import logging as hf_logging


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))

import image_classification  # noqa: E402
import translation  # noqa: E402

import kron_transformers as kt  # noqa: E402


VOCAB = 4000
WIDE_T5 = dict(d_model=256, d_kv=64, d_ff=1024, num_layers=3, num_decoder_layers=3, num_heads=4, dropout_rate=0.1)
SHAPESHIFTER = {
    "embedding": {"method": "Shapeshifter", "rank": 32},
    "attention": {"method": "Shapeshifter", "rank": 8},
    "ffn": {"method": "Shapeshifter", "rank": 8},
    "init": "random",
}
VIT = "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512,image_size=32,patch_size=4"
KPD = {"attention": {"method": "KPD", "rank": 4, "block_size": [4, 4]}, "ffn": {"method": "KPD", "rank": 4,
       "block_size": [4, 4]}, "init": "random"}  # fmt: skip


def t5(**settings):
    config = AutoConfig.for_model("t5", vocab_size=VOCAB, decoder_start_token_id=0, **settings)
    return AutoModelForSeq2SeqLM.from_config(config)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_low_rank() -> dict:
    """LowRank per role at the Shapeshifter model's dense/compressed ratio of that role (rank rounded down)."""
    summary = kt.report(kt.compress_model(t5(**WIDE_T5), kt.KronConfig.from_dict(SHAPESHIFTER)))
    config = {"init": "random"}
    for role in ("embedding", "attention", "ffn"):
        rows = [row for row in summary.modules if row.role == role]
        ratio = sum(r.dense_parameters for r in rows) / sum(r.compressed_parameters for r in rows)
        config[role] = {"method": "LowRank", "compression": ratio}
    return config


def matched_dense_width(target: int) -> dict:
    """A dense T5 of the same depth, d_model a multiple of 8 (d_ff = 4 d_model), with about ``target`` parameters."""
    best = min(range(16, 257, 8), key=lambda d: abs(parameters(t5(**{**WIDE_T5, **_width(d)})) - target))
    return {**WIDE_T5, **_width(best)}


def _width(d_model: int) -> dict:
    return dict(d_model=d_model, d_kv=d_model // 4, d_ff=4 * d_model)


def overrides(settings: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in settings.items())


def run(main, name: str, arguments: list[str]) -> dict:
    start = time.perf_counter()
    results = main(arguments)
    return {
        "run": name,
        "parameters": results["parameters"]["total"],
        "metric": next(iter(results["metrics"].items())),
        "steps": results["steps"],
        "train_loss": results["train_loss"],
        "train_s": results["train_seconds"],
        "total_s": time.perf_counter() - start,
    }


def multi30k(data: Path, output: Path, seconds: float) -> list[dict]:
    folder = data / "multi30k"
    common = [
        "--train_file", str(folder / "train"), "--validation_file", str(folder / "val"),
        "--test_file", str(folder / "test_2016_flickr"), "--source_lang", "de", "--target_lang", "en",
        "--tokenizer_vocab_size", str(VOCAB), "--max_train_seconds", str(seconds), "--max_steps", "100000",
        "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "100", "--learning_rate", "3e-3",
        "--warmup_steps", "100", "--label_smoothing", "0.1", "--max_source_length", "48", "--max_target_length", "48",
        "--generation_max_length", "40", "--checkpointing_steps", "0", "--logging_steps", "1000",
    ]  # fmt: skip
    shapeshifter, low_rank = output / "shapeshifter.yaml", output / "lowrank.yaml"
    shapeshifter.write_text(yaml.safe_dump(SHAPESHIFTER))
    low_rank.write_text(yaml.safe_dump(matched_low_rank()))
    target = parameters(kt.compress_model(t5(**WIDE_T5), kt.KronConfig.from_dict(SHAPESHIFTER)))
    runs = [
        ("Multi30k dense (narrow)", overrides(matched_dense_width(target)), "none"),
        ("Multi30k Shapeshifter", overrides(WIDE_T5), str(shapeshifter)),
        ("Multi30k LowRank", overrides(WIDE_T5), str(low_rank)),
    ]
    return [
        run(translation.main, name, [*common, "--model_config", "t5", "--config_overrides", settings,
            "--compression", compression, "--output_dir", str(output / name.split(" (")[0].replace(" ", "_"))])
        for name, settings, compression in runs
    ]  # fmt: skip


def cifar10(data: Path, output: Path, seconds: float) -> list[dict]:
    with np.load(data / "cifar10" / "test_images.npz") as arrays:
        images, labels, classes = arrays["images"], arrays["labels"], arrays["classes"]
    order = np.random.default_rng(0).permutation(len(labels))  # the file is sorted by class
    train, test = order[:9000], order[9000:]
    np.savez(output / "train.npz", images=images[train], labels=labels[train], classes=classes)
    np.savez(output / "test.npz", images=images[test], labels=labels[test], classes=classes)
    kpd = output / "kpd.yaml"
    kpd.write_text(yaml.safe_dump(KPD))
    common = [
        "--train_file", str(output / "train.npz"), "--test_file", str(output / "test.npz"), "--model_config", "vit",
        "--config_overrides", VIT, "--max_train_seconds", str(seconds), "--max_steps", "100000",
        "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "250", "--learning_rate", "2e-3",
        "--weight_decay", "0.05", "--warmup_steps", "50", "--checkpointing_steps", "0", "--logging_steps", "1000",
    ]  # fmt: skip
    return [
        run(image_classification.main, "CIFAR-10 dense ViT",
            [*common, "--compression", "none", "--output_dir", str(output / "vit_dense")]),
        run(image_classification.main, "CIFAR-10 KPD ViT",
            [*common, "--compression", str(kpd), "--kpd_l1", "1e-3", "--output_dir", str(output / "vit_kpd")]),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder holding multi30k/ and cifar10/ (see the docstring)")
    parser.add_argument("--seconds", type=float, default=90.0, help="training time budget per run")
    parser.add_argument("--output-dir", default="/tmp/recipes_real_data", help="where the runs write")
    parser.add_argument("--only", choices=("multi30k", "cifar10"), help="run one of the two comparisons")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fair on a shared machine)")
    args = parser.parse_args()
    data = Path(args.data)
    needed = {"multi30k": data / "multi30k" / "train.de.gz", "cifar10": data / "cifar10" / "test_images.npz"}
    missing = [str(path) for name, path in needed.items() if args.only in (None, name) and not path.is_file()]
    if missing:
        parser.error(f"data folder {data}: missing {', '.join(missing)} (DATA must hold multi30k/ and cifar10/)")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.only in (None, "multi30k"):
        rows += multi30k(data, output, args.seconds)
    if args.only in (None, "cifar10"):
        rows += cifar10(data, output, args.seconds)
    print(f"\ntraining budget {args.seconds:.0f} s per run (wall clock), {args.threads} CPU thread(s)\n")
    print("| run | parameters | metric | steps | last train loss | train s | total s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        metric, value = row["metric"]
        print(
            f"| {row['run']} | {row['parameters']:,} | {metric} {value:.2f} | {row['steps']} | "
            f"{row['train_loss']:.3f} | {row['train_s']:.0f} | {row['total_s']:.0f} |"
        )
    (output / "table.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
