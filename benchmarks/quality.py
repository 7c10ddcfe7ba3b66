"""Quality at a size, trained to convergence on real data: the papers' claims checked on three tasks.

    python benchmarks/quality.py DATA [--jobs 2] [--threads 1] [--output-dir outputs/quality]
    python benchmarks/plot_results.py outputs/quality          # the plots, from the runs' files

DATA holds ``multi30k/{train,val,test_2016_flickr}.{de,en}.gz``, ``aeslc/{train,dev,test}.jsonl.gz`` and
``cifar10/test_images.npz`` (the project's benchmark data; a fresh clone lacks it, and the script then names what is
missing). Every run is one recipe invocation (``recipes/*.py``; AESLC's: two, see below) in its own process and
``--output_dir`` (``OUTPUT/<task>/<run>``) with its ``results.json`` and ``train_log.jsonl``; a run whose
``results.json`` exists is not run again, so an interrupted benchmark resumes. Training stops at the step budget or
early (validation metric every ``eval_steps``, patience 2), and the best validation weights are the ones tested.

- **Translation, Multi30k De-En**: one 8,000-token BPE vocabulary trained on the training pairs; a T5 (d_model 256,
  3+3 layers, d_ff 1024) dense; the same T5 with Shapeshifter (Panahi, section 4.3) on the embedding and every
  attention and feed-forward matrix, twice (embedding rank 32 and attention/FFN rank 16; and embedding rank 96,
  attention/FFN rank 10, which gives the embedding half of the parameters as Panahi's 16/256 does); the same T5 with
  LowRank at each Shapeshifter run's per-role parameter ratios; a narrower dense T5 with about Shapeshifter's
  parameter count (the fair baseline). sacreBLEU on test_2016_flickr, greedy. Budget 2,400 steps of 64 pairs (5.3
  epochs; LAMB 1e-2 as Panahi trains, 100 warm-up steps, linear decay), validation BLEU every 400. LAMB's per-tensor
  trust ratio makes every step a relative change of each tensor, which T5's N(0, 1) tied embedding needs: AdamW's
  absolute steps barely move it (measured: BLEU 6.3 after 2,000 AdamW steps, 24.3 after 1,200 LAMB steps).
- **Summarization, AESLC** (email body -> subject line): an 8,000-token BPE vocabulary; a T5 (d_model 128, 2+2
  layers) with a dense embedding, a word2ketXS embedding (Panahi, section 3.4.2; order 2, rank 10: 50x smaller),
  a LowRank embedding of the same size, a narrower dense T5 (d_model 80) of about word2ketXS's parameter count
  (the fair baseline, as in translation), and word2ketXS at rank 40, which has the narrow T5's parameter count
  (12.6x smaller embedding). Each run trains twice: first 800 steps of 32 copying every training
  email's first 12 words (the copy task; LAMB 1e-2, constant after 100 warm-up steps, no label smoothing), then,
  from that model, up to 4,000 steps of 32 on the subjects (LAMB 1e-2, linear decay, label smoothing 0.1),
  validation every 500. Trained on the subjects alone, the T5 never read the email (the subjects' NLL was the same with
  another email after 13 epochs); after the copy task it does. ROUGE-1/2/L F1 on the test split, greedy. T5 ties
  its output layer to the embedding (transformers forces it), so word2ketXS factorizes that layer too; Panahi's
  models keep theirs dense (section 3.5). Two more word2ketXS runs do: ``word2ketxs_dense_head``
  (``KronConfig(untie_lm_head=True)``: the head keeps the dense initial table as its own weight, through both stages)
  and ``word2ketxs_untied_head`` (the copy stage tied, then the recipes' ``--untie_lm_head``: the subject stage starts
  from a dense head equal to the trained factorized table).
- **Image classification, CIFAR-10**: the 10,000 shipped images shuffled with seed 0 and split 8,000 train /
  1,000 validation / 1,000 test; a ViT (32x32, patch 4, d 128, 4 layers) dense, with KPD (Zhu et al., eq. 3; rank
  4, 4x4 blocks, l1 proximal step on S, eq. 4, lambda 1e-5 to 1e-3), and with LowRank at KPD's parameter
  count. Top-1 accuracy on the test images. 1,500 steps of 64 (12 epochs), validation every 250.

``--fraction F`` keeps that share of every split and ``--max-steps N`` caps every budget (a smoke run); the table
(``OUTPUT/quality_table.md``) and the rows (``OUTPUT/quality_rows.json``) of every finished run of the chosen tasks
are written at the end (``--runs`` only limits what is trained; ``--table`` trains nothing). Each row holds its run's
validation curve, and ``--keep-rows benchmarks/quality_rows`` merges the rows, without their run folders, into one
file per task there: the project's measured rows, from which ``plot_results.py`` redraws the plots once the run
folders are gone.

``--seeds 42 43`` trains each chosen run once per seed (the recipes' ``--seed``: initialization, data order,
dropout). Seed 42, the recipes' default, keeps the folder ``OUTPUT/<task>/<run>``; another seed S trains in
``OUTPUT/<task>/<run>_seedS``. Every finished seed is a row, and runs with more than one seed get a second table
with the mean and range of the test metric.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoConfig, AutoModelForSeq2SeqLM
from transformers.utils import logging as hf_logging

import kron_transformers as kt


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TASKS = ("translation", "cifar10", "summarization")

# Translation: Multi30k De-En.
VOCAB = 8000
WIDE_T5 = dict(d_model=256, d_kv=64, d_ff=1024, num_layers=3, num_decoder_layers=3, num_heads=4, dropout_rate=0.1)
SHAPESHIFTER = {
    "embedding": {"method": "Shapeshifter", "rank": 32},
    "attention": {"method": "Shapeshifter", "rank": 16},
    "ffn": {"method": "Shapeshifter", "rank": 16},
    "init": "random",
}
# Panahi's Shapeshifter 16/256 gives the embedding about half of the model's parameters; the run above gives it 16%.
SHAPESHIFTER_HALF_EMBEDDING = {
    "embedding": {"method": "Shapeshifter", "rank": 96},
    "attention": {"method": "Shapeshifter", "rank": 10},
    "ffn": {"method": "Shapeshifter", "rank": 10},
    "init": "random",
}
TRANSLATION_STEPS, TRANSLATION_EVAL = 2400, 400

# Summarization: AESLC. Trained on the subjects alone, this T5 never reads the email (stop 25: the subjects' NLL is
# the same with another email after 6,000 steps); COPY_STEPS steps of copying each email's first LEAD_WORDS words
# first make the cross-attention read it (stop 28), and the run then fine-tunes on the subjects.
SUMMARY_T5 = dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.1)
WORD2KETXS = {"embedding": {"method": "Word2KetXS", "order": 2, "rank": 10}, "init": "random"}
WORD2KETXS_RANK40 = {**WORD2KETXS, "embedding": {**WORD2KETXS["embedding"], "rank": 40}}  # dense_narrow's size
WORD2KETXS_DENSE_HEAD = {**WORD2KETXS, "untie_lm_head": True}  # Panahi's protocol: the softmax layer stays dense
LEAD_WORDS, COPY_STEPS = 12, 800
SUMMARY_STEPS, SUMMARY_EVAL = 4000, 500

# Image classification: CIFAR-10.
VIT = "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=512,image_size=32,patch_size=4"
KPD = {
    "attention": {"method": "KPD", "rank": 4, "block_size": [4, 4]},
    "ffn": {"method": "KPD", "rank": 4, "block_size": [4, 4]},
    "init": "random",
}
# Zhu et al. do not give eq. 4's lambda; 3e-5 gives their ~50% block sparsity here (measured, with 1e-5 to 1e-3
# beside it). With AdamW the recipe's proximal step thresholds in Adam's metric, so an entry of S stays 0 while
# |dJ/dS| <= lambda (minibatch |dJ/dS| of this ViT at init: median 4e-4, 90th percentile 2e-3).
KPD_L1 = {"kpd": "3e-5", "kpd_l1_1e-5": "1e-5", "kpd_l1_1e-4": "1e-4", "kpd_l1_1e-3": "1e-3"}
IMAGE_STEPS, IMAGE_EVAL = 1500, 250
PATIENCE = 2
DEFAULT_SEED = 42  # the recipes' --seed default
PRETRAINING = "pretraining"  # a two-stage run's first folder, inside its own

# The paper's reported gap per task (compressed minus dense), for the table.
PAPER = {
    "translation": "Shapeshifter 16/256 on T5-small, IWSLT'14 De-En: BLEU 36.36 vs 36.72 dense (-0.36) at 14.4x "
    "fewer parameters (Panahi, Table 5)",
    "summarization": "word2ketXS embedding, GIGAWORD: 'over 100-fold space reduction while reducing the Rouge "
    "scores by only about 0.5' (Panahi, section 3.5)",
    "cifar10": "KPD 4x4 ViT-tiny, CIFAR-100: 62.99% vs 64.32% dense (-1.33) (Zhu et al., Table 3)",
}


@dataclass
class Run:
    task: str
    name: str
    method: str
    recipe: str
    arguments: list[str]
    compression: dict | None = None
    note: str = ""
    folder: Path = field(default=Path())
    seed: int = DEFAULT_SEED
    # The arguments of a first recipe invocation (compressed, into folder/PRETRAINING) whose model the run then
    # fine-tunes with ``arguments`` (--model_name_or_path); None: one invocation.
    pretraining: list[str] | None = None

    def at_seed(self, seed: int, output: Path) -> Run:
        """This run trained with the recipe's ``--seed seed``, in its own folder under ``output``."""
        folder = output / self.task / (self.name if seed == DEFAULT_SEED else f"{self.name}_seed{seed}")
        if seed == DEFAULT_SEED:
            return replace(self, folder=folder)
        seeded = ["--seed", str(seed)]
        pretraining = None if self.pretraining is None else [*self.pretraining, *seeded]
        return replace(self, arguments=[*self.arguments, *seeded], folder=folder, seed=seed, pretraining=pretraining)


def finished_seeds(run: Run, output: Path) -> list[int]:
    """The seeds of ``run`` whose results.json exists under ``output``, the default seed first."""
    seeds = [DEFAULT_SEED] if (output / run.task / run.name / "results.json").is_file() else []
    pattern = re.compile(rf"{re.escape(run.name)}_seed(\d+)")
    for folder in sorted((output / run.task).glob(f"{run.name}_seed*")):
        match = pattern.fullmatch(folder.name)
        if match and (folder / "results.json").is_file():
            seeds.append(int(match.group(1)))
    return seeds


def t5(vocab: int, **settings) -> torch.nn.Module:
    config = AutoConfig.for_model("t5", vocab_size=vocab, decoder_start_token_id=0, **settings)
    return AutoModelForSeq2SeqLM.from_config(config)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compressed_parameters(settings: dict, compression: dict) -> int:
    """Parameters of the T5 with ``settings`` (``VOCAB`` tokens) after ``compression``."""
    return parameters(kt.compress_model(t5(VOCAB, **settings), kt.KronConfig.from_dict(compression)))


def matched_low_rank(model: torch.nn.Module, compression: dict) -> dict:
    """LowRank per role at ``compression``'s dense/compressed parameter ratio of that role."""
    summary = kt.report(kt.compress_model(model, kt.KronConfig.from_dict(compression)))
    config = {"init": "random"}
    for role in sorted({row.role for row in summary.modules}):
        rows = [row for row in summary.modules if row.role == role]
        ratio = sum(r.dense_parameters for r in rows) / sum(r.compressed_parameters for r in rows)
        config[role] = {"method": "LowRank", "compression": ratio}
    return config


def matched_dense_width(target: int, vocab: int, base: dict) -> dict:
    """The T5 ``base`` narrowed (d_model a multiple of 8, d_ff = 4 d_model) to about ``target`` parameters."""

    def width(d_model: int) -> dict:
        return {**base, "d_model": d_model, "d_kv": d_model // 4, "d_ff": 4 * d_model}

    best = min(range(16, base["d_model"] + 1, 8), key=lambda d: abs(parameters(t5(vocab, **width(d))) - target))
    return width(best)


def overrides(settings: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in settings.items())


def schedule(steps: int, eval_steps: int, cap: int | None) -> list[str]:
    if cap is not None:
        steps, eval_steps = min(steps, cap), min(eval_steps, cap)
    return ["--max_steps", str(steps), "--eval_steps", str(eval_steps), "--early_stopping_patience", str(PATIENCE)]


def sample_limits(sizes: dict[str, int], fraction: float) -> list[str]:
    if fraction >= 1:
        return []
    train = max(8, int(sizes["train"] * fraction))
    evaluation = max(4, int(min(sizes["validation"], sizes["test"]) * fraction))
    return ["--max_train_samples", str(train), "--max_eval_samples", str(evaluation)]


def translation_runs(data: Path, fraction: float, cap: int | None) -> list[Run]:
    folder = data / "multi30k"
    common = [
        "--train_file", str(folder / "train"), "--validation_file", str(folder / "val"),
        "--test_file", str(folder / "test_2016_flickr"), "--source_lang", "de", "--target_lang", "en",
        "--model_config", "t5", "--tokenizer_vocab_size", str(VOCAB), "--group_by_length",
        "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "200", "--optimizer", "lamb",
        "--learning_rate", "1e-2", "--lr_scheduler", "linear", "--warmup_steps", "100", "--label_smoothing", "0.1",
        "--max_source_length", "48", "--max_target_length", "48", "--generation_max_length", "48",
        *schedule(TRANSLATION_STEPS, TRANSLATION_EVAL, cap),
        *sample_limits({"train": 29000, "validation": 1014, "test": 1000}, fraction),
    ]  # fmt: skip
    shapeshifter = compressed_parameters(WIDE_T5, SHAPESHIFTER)
    narrow = matched_dense_width(shapeshifter, VOCAB, WIDE_T5)
    wide = ["--config_overrides", overrides(WIDE_T5)]
    ranks = "embedding rank 32, attention/FFN rank 16"
    return [
        Run("translation", "dense", "dense", "translation", [*common, *wide], None, "d_model 256"),
        Run("translation", "shapeshifter", "Shapeshifter", "translation", [*common, *wide], SHAPESHIFTER, ranks),
        Run("translation", "shapeshifter_half_embedding", "Shapeshifter", "translation", [*common, *wide],
            SHAPESHIFTER_HALF_EMBEDDING, "embedding rank 96, attention/FFN rank 10"),
        Run("translation", "lowrank", "LowRank", "translation", [*common, *wide],
            matched_low_rank(t5(VOCAB, **WIDE_T5), SHAPESHIFTER), "Shapeshifter's per-role ratios"),
        Run("translation", "lowrank_half_embedding", "LowRank", "translation", [*common, *wide],
            matched_low_rank(t5(VOCAB, **WIDE_T5), SHAPESHIFTER_HALF_EMBEDDING),
            "the half-embedding Shapeshifter's per-role ratios"),
        Run("translation", "dense_narrow", "dense (narrow)", "translation",
            [*common, "--config_overrides", overrides(narrow)], None, f"d_model {narrow['d_model']}"),
    ]  # fmt: skip


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it onto ``path``: a run of another ``quality.py``
    reading ``path`` meanwhile (every call rewrites the derived data files) sees the old file or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}{path.suffix}")  # one per process; keeps the suffix
    try:
        write(temporary)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def lead_copies(emails: Path, path: Path) -> Path:
    """The copy task: every training email paired with its first LEAD_WORDS words."""

    def write(temporary: Path) -> None:
        with gzip.open(emails, "rt", encoding="utf-8") as source, gzip.open(temporary, "wt", encoding="utf-8") as out:
            for row in map(json.loads, source):
                lead = " ".join(row["document"].split()[:LEAD_WORDS])
                if lead:
                    out.write(json.dumps({"document": row["document"], "subject": lead}) + "\n")

    write_whole(path, write)
    return path


def summarization_runs(data: Path, work: Path, fraction: float, cap: int | None) -> list[Run]:
    folder = data / "aeslc"
    copies = lead_copies(folder / "train.jsonl.gz", work / "aeslc_lead_copies.jsonl.gz")
    shared = [
        "--validation_file", str(folder / "dev.jsonl.gz"), "--source_column", "document",
        "--target_column", "subject", "--group_by_length", "--per_device_train_batch_size", "32",
        "--per_device_eval_batch_size", "200", "--optimizer", "lamb", "--learning_rate", "1e-2",
        "--warmup_steps", "100", "--max_source_length", "64", "--max_target_length", "16",
        *sample_limits({"train": 14436, "validation": 1960, "test": 1906}, fraction),
    ]  # fmt: skip

    def copying(settings: dict) -> list[str]:
        """The copy stage of a T5 with ``settings``; the subject stage loads its checkpoint."""
        return [
            "--train_file", str(copies), *shared, "--model_config", "t5", "--config_overrides", overrides(settings),
            "--tokenizer_vocab_size", str(VOCAB), "--lr_scheduler", "constant", "--label_smoothing", "0",
            "--max_steps", str(COPY_STEPS if cap is None else min(COPY_STEPS, cap)),
        ]  # fmt: skip

    subjects = [
        "--train_file", str(folder / "train.jsonl.gz"), "--test_file", str(folder / "test.jsonl.gz"), *shared,
        "--lr_scheduler", "linear", "--label_smoothing", "0.1", *schedule(SUMMARY_STEPS, SUMMARY_EVAL, cap),
    ]  # fmt: skip
    low_rank = matched_low_rank(t5(VOCAB, **SUMMARY_T5), WORD2KETXS)
    word2ketxs = compressed_parameters(SUMMARY_T5, WORD2KETXS)
    narrow = matched_dense_width(word2ketxs, VOCAB, SUMMARY_T5)
    embedding = f"{VOCAB:,} x {SUMMARY_T5['d_model']} embedding"
    wide_copying = copying(SUMMARY_T5)
    return [
        Run("summarization", "dense", "dense", "summarization", subjects, None, embedding, pretraining=wide_copying),
        Run("summarization", "word2ketxs", "word2ketXS", "summarization", subjects, WORD2KETXS, "order 2, rank 10",
            pretraining=wide_copying),
        Run("summarization", "word2ketxs_rank40", "word2ketXS", "summarization", subjects, WORD2KETXS_RANK40,
            "order 2, rank 40: dense (narrow)'s parameter count", pretraining=wide_copying),
        Run("summarization", "word2ketxs_dense_head", "word2ketXS", "summarization", subjects, WORD2KETXS_DENSE_HEAD,
            "order 2, rank 10; output layer dense from the start", pretraining=wide_copying),
        Run("summarization", "word2ketxs_untied_head", "word2ketXS", "summarization", [*subjects, "--untie_lm_head"],
            WORD2KETXS, "order 2, rank 10; output layer untied after the copy stage", pretraining=wide_copying),
        Run("summarization", "lowrank", "LowRank", "summarization", subjects, low_rank, "embedding, same size",
            pretraining=wide_copying),
        Run("summarization", "dense_narrow", "dense (narrow)", "summarization", subjects, None,
            f"d_model {narrow['d_model']}, word2ketXS's parameter count", pretraining=copying(narrow)),
    ]  # fmt: skip


def cifar10_split(data: Path, work: Path, fraction: float) -> dict[str, Path]:
    """The shipped images (sorted by class) shuffled with seed 0, split 80% train / 10% validation / 10% test
    (8,000 / 1,000 / 1,000 of the 10,000); ``fraction`` keeps that share of each part."""
    with np.load(data / "cifar10" / "test_images.npz") as arrays:
        images, labels, classes = arrays["images"], arrays["labels"], arrays["classes"]
    order = np.random.default_rng(0).permutation(len(labels))
    cuts = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
    paths = {}
    for split, (low, high) in cuts.items():
        part = order[int(low * len(order)) : int(high * len(order))]
        keep = part[: max(10, int(len(part) * fraction))]
        paths[split] = work / f"cifar10_{split}.npz"
        write_whole(paths[split], lambda to: np.savez(to, images=images[keep], labels=labels[keep], classes=classes))
    return paths


def cifar10_runs(data: Path, work: Path, fraction: float, cap: int | None) -> list[Run]:
    paths = cifar10_split(data, work, fraction)
    common = [
        "--train_file", str(paths["train"]), "--validation_file", str(paths["validation"]),
        "--test_file", str(paths["test"]), "--model_config", "vit", "--config_overrides", VIT,
        "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "250", "--learning_rate", "2e-3",
        "--weight_decay", "0.05", "--lr_scheduler", "linear", "--warmup_steps", "200",
        *schedule(IMAGE_STEPS, IMAGE_EVAL, cap),
    ]  # fmt: skip
    vit = AutoConfig.for_model("vit", num_labels=10, **{k: int(v) for k, v in (s.split("=") for s in VIT.split(","))})
    from transformers import AutoModelForImageClassification

    low_rank = matched_low_rank(AutoModelForImageClassification.from_config(vit), KPD)
    return [
        Run("cifar10", "dense", "dense", "image_classification", common, None, "d 128, 4 layers"),
        *(Run("cifar10", name, "KPD", "image_classification", [*common, "--kpd_l1", strength], KPD,
              f"rank 4, 4x4 blocks, l1 {strength}") for name, strength in KPD_L1.items()),
        Run("cifar10", "lowrank", "LowRank", "image_classification", common, low_rank, "KPD's per-role ratios"),
    ]  # fmt: skip


def launch(run: Run, threads: int) -> None:
    """A run's recipe invocations, each in its own process; skipped when its results.json exists."""
    if (run.folder / "results.json").is_file():
        return
    run.folder.mkdir(parents=True, exist_ok=True)
    compression = "none"
    if run.compression is not None:
        compression = str(run.folder / "compression.yaml")
        Path(compression).write_text(yaml.safe_dump(run.compression))
    start = time.perf_counter()
    if run.pretraining is None:
        invoke(run, [*run.arguments, "--compression", compression], run.folder, threads)
    else:
        first = run.folder / PRETRAINING
        if not (first / "results.json").is_file():
            invoke(run, [*run.pretraining, "--compression", compression], first, threads)
        fine_tuning = [*run.arguments, "--model_name_or_path", str(first), "--compression", "none"]
        invoke(run, fine_tuning, run.folder, threads)  # the checkpoint reloads compressed
    print(f"{run.task}/{run.name}: done in {time.perf_counter() - start:.0f} s", flush=True)


def invoke(run: Run, arguments: list[str], folder: Path, threads: int) -> None:
    """One recipe invocation writing into ``folder`` (its log: ``folder/stdout.log``)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(RECIPES / f"{run.recipe}.py"), *arguments]
    command += ["--output_dir", str(folder), "--checkpointing_steps", "0", "--logging_steps", "100"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with (folder / "stdout.log").open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    if finished.returncode != 0:
        raise RuntimeError(f"{run.task}/{run.name} failed (exit {finished.returncode}): see {log.name}")


def result_rows(finished: list[Run], results: list[dict]) -> list[dict]:
    """A row per finished run, its size against its task's dense run at any seed (the count does not depend on
    the seed), or against its own model's dense count where the task's dense run has not finished."""
    dense = {run.task: result["parameters"]["total"] for run, result in zip(finished, results) if run.name == "dense"}
    return [
        row(run, result, dense.get(run.task, result["parameters"]["dense"])) for run, result in zip(finished, results)
    ]


def row(run: Run, results: dict, dense_parameters: int) -> dict:
    first = run.folder / PRETRAINING / "results.json"
    pretraining = json.loads(first.read_text()) if run.pretraining is not None and first.is_file() else None
    return {
        "task": run.task,
        "run": run.name,
        "seed": run.seed,
        "method": run.method,
        "note": run.note,
        "parameters": results["parameters"]["total"],
        "fewer_than_dense": dense_parameters / results["parameters"]["total"],
        "metrics": results["metrics"],
        "validation": results.get("validation", {}),
        "best_step": results.get("best_step"),
        "steps": results["steps"],
        "stopped_early": results.get("stopped_early", False),
        "train_seconds": results["train_seconds"] + (pretraining["train_seconds"] if pretraining else 0),
        "pretraining_steps": pretraining["steps"] if pretraining else 0,
        "pretraining_metrics": pretraining["metrics"] if pretraining else None,
        "kpd": results.get("kpd"),
        "curve": validation_curve(run.folder),
        "folder": str(run.folder),
    }


def validation_curve(folder: Path) -> dict:
    """The first validation metric over a run's ``train_log.jsonl``: ``{"metric": name, "steps": [...],
    "values": [...]}`` (the copy stage of a two-stage run is left out: its metric is the copying's)."""
    curve = {"metric": "", "steps": [], "values": []}
    log = folder / "train_log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        record = json.loads(line)
        metric = next((key for key in record if key.startswith("validation_")), None)
        if metric is not None:
            curve["metric"] = metric
            curve["steps"].append(record["step"])
            curve["values"].append(record[metric])
    return curve


def keep_rows(rows: list[dict], runs: list[Run], directory: Path) -> None:
    """Each task's rows also into ``directory/<task>.json``, without their run folders, merged with the rows
    already there (a run's seed replaces its old row), so that ``plot_results.py directory`` draws the plots again
    once the run folders are gone. Rows are kept in ``runs``' order, the default seed first."""
    order = {(run.task, run.name): index for index, run in enumerate(runs)}
    directory.mkdir(parents=True, exist_ok=True)
    for task in dict.fromkeys(row["task"] for row in rows):
        path = directory / f"{task}.json"
        kept = {(old["run"], old["seed"]): old for old in json.loads(path.read_text())} if path.is_file() else {}
        for new in (new for new in rows if new["task"] == task):
            kept[new["run"], new["seed"]] = {key: value for key, value in new.items() if key != "folder"}
        merged = sorted(
            kept.values(),
            key=lambda row: (order.get((task, row["run"]), len(order)), row["seed"] != DEFAULT_SEED, row["seed"]),
        )
        write_whole(path, lambda temporary: temporary.write_text(json.dumps(merged, indent=1) + "\n"))


def table(rows: list[dict]) -> str:
    lines = []
    for task in TASKS:
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        lines += [f"\n**{task}** (paper: {PAPER[task]})\n"]
        lines += ["| run | parameters | x fewer | test | best validation (step) | steps | train min |"]
        lines += ["| --- | ---: | ---: | --- | --- | ---: | ---: |"]
        for r in task_rows:
            test = ", ".join(f"{k.removeprefix('test_')} {v:.2f}" for k, v in r["metrics"].items())
            validation = ", ".join(f"{k} {v:.2f}" for k, v in list(r["validation"].items())[:1])
            early = " early stop" if r["stopped_early"] else ""
            copying = f"{r['pretraining_steps']} copy + " if r.get("pretraining_steps") else ""
            seed = "" if r["seed"] == DEFAULT_SEED else f", seed {r['seed']}"
            lines.append(
                f"| {r['method']} ({r['note']}{seed}) | {r['parameters']:,} | {r['fewer_than_dense']:.1f} | {test} | "
                f"{validation} ({r['best_step']}) | {copying}{r['steps']}{early} | {r['train_seconds'] / 60:.1f} |"
            )
    return "\n".join(lines + seed_spread(rows)) + "\n"


def seed_spread(rows: list[dict]) -> list[str]:
    """Mean and range of the first test metric over the seeds of every run trained with more than one."""
    runs = {}
    for r in rows:
        runs.setdefault((r["task"], r["run"]), []).append(r)
    seeded = {key: group for key, group in runs.items() if len(group) > 1}
    if not seeded:
        return []
    lines = ["\n**across seeds**\n", "| task | run | seeds | test mean | test min-max |"]
    lines += ["| --- | --- | --- | --- | --- |"]
    for (task, _), group in seeded.items():
        metric = next(iter(group[0]["metrics"]))
        scores = [r["metrics"][metric] for r in group]
        lines.append(
            f"| {task} | {group[0]['method']} ({group[0]['note']}) | {', '.join(str(r['seed']) for r in group)} | "
            f"{metric.removeprefix('test_')} {np.mean(scores):.2f} | {min(scores):.2f}-{max(scores):.2f} |"
        )
    return lines


def check_data(parser: argparse.ArgumentParser, data: Path, tasks: list[str]) -> None:
    needed = {
        "translation": data / "multi30k" / "train.de.gz",
        "summarization": data / "aeslc" / "train.jsonl.gz",
        "cifar10": data / "cifar10" / "test_images.npz",
    }
    missing = [str(needed[task]) for task in tasks if not needed[task].is_file()]
    if missing:
        parser.error(f"data folder {data}: missing {', '.join(missing)} (DATA must hold multi30k/, aeslc/, cifar10/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="folder holding multi30k/, aeslc/ and cifar10/ (see the docstring)")
    parser.add_argument("--output-dir", default="outputs/quality", help="one folder per run under TASK/RUN")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--runs", nargs="+", help="only these run names (e.g. dense shapeshifter)")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[DEFAULT_SEED], help="train each chosen run once per seed"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of every split kept (smoke runs)")
    parser.add_argument("--max-steps", type=int, help="cap every run's step budget (smoke runs)")
    parser.add_argument(
        "--table", action="store_true", help="train nothing: the table and rows of the runs already finished"
    )
    parser.add_argument(
        "--keep-rows",
        metavar="DIR",
        help="also merge the finished rows, without their run folders, into DIR/<task>.json (the project keeps "
        "its measured rows in benchmarks/quality_rows, from which plot_results.py redraws the plots)",
    )
    args = parser.parse_args(argv)
    data, output = Path(args.data), Path(args.output_dir)
    check_data(parser, data, args.tasks)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    hf_logging.set_verbosity_error()
    output.mkdir(parents=True, exist_ok=True)
    builders = {
        "translation": lambda: translation_runs(data, args.fraction, args.max_steps),
        "summarization": lambda: summarization_runs(data, output, args.fraction, args.max_steps),
        "cifar10": lambda: cifar10_runs(data, output, args.fraction, args.max_steps),
    }
    runs = [run for task in args.tasks for run in builders[task]()]
    if args.runs is not None and not set(args.runs) <= {run.name for run in runs}:
        unknown = sorted(set(args.runs) - {run.name for run in runs})
        parser.error(f"--runs {' '.join(unknown)}: no such run in {', '.join(args.tasks)}; the runs are "
                     f"{', '.join(sorted({run.name for run in runs}))}")  # fmt: skip
    if not args.table:
        selected = [run for run in runs if args.runs is None or run.name in args.runs]
        selected = [run.at_seed(seed, output) for seed in args.seeds for run in selected]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda run: launch(run, args.threads), selected))
    finished = [run.at_seed(seed, output) for run in runs for seed in finished_seeds(run, output)]
    rows = result_rows(finished, [json.loads((run.folder / "results.json").read_text()) for run in finished])
    (output / "quality_rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.keep_rows is not None:
        keep_rows(rows, runs, Path(args.keep_rows))
    text = table(rows)
    (output / "quality_table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
