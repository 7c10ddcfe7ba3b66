"""benchmarks/quality.py as a smoke run on generated data in the shared data layout, and its plots.

The real runs (Multi30k, AESLC, CIFAR-10 from the project's data folder) take hours; here every task runs its
dense model and one compressed model for two steps on a few generated examples, twice (the second run resumes:
nothing is trained again), then ``plot_results.py`` draws both figures from the files.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest


BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
WORDS = "ein mann frau hund läuft spielt auf gras ball rot blau kind sitzt".split()
ENGLISH = "a man woman dog runs plays on grass ball red blue child sits".split()


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_lines(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def fake_data(root: Path) -> Path:
    rng = random.Random(0)
    multi30k = root / "multi30k"
    multi30k.mkdir(parents=True)
    for split, size in (("train", 40), ("val", 8), ("test_2016_flickr", 8)):
        picks = [[rng.randrange(len(WORDS)) for _ in range(rng.randint(3, 8))] for _ in range(size)]
        write_lines(multi30k / f"{split}.de.gz", [" ".join(WORDS[i] for i in pick) for pick in picks])
        write_lines(multi30k / f"{split}.en.gz", [" ".join(ENGLISH[i] for i in pick) for pick in picks])
    aeslc = root / "aeslc"
    aeslc.mkdir()
    for split, size in (("train", 40), ("dev", 8), ("test", 8)):
        rows = []
        for _ in range(size):
            subject = " ".join(rng.choice(ENGLISH) for _ in range(3))
            rows.append(
                json.dumps({"document": f"{subject}. " + " ".join(rng.choices(ENGLISH, k=20)), "subject": subject})
            )
        write_lines(aeslc / f"{split}.jsonl.gz", rows)
    cifar = root / "cifar10"
    cifar.mkdir()
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, size=(200, 32, 32, 3), dtype=np.uint8)
    np.savez(
        cifar / "test_images.npz",
        images=images,
        labels=np.repeat(np.arange(10), 20),
        classes=np.arange(10).astype(str),
    )
    return root


def test_quality_smoke_run_resumes_and_plots(tmp_path, capsys):
    data, output = fake_data(tmp_path / "data"), tmp_path / "quality"
    quality = load("quality")
    kept = tmp_path / "kept_rows"
    arguments = [str(data), "--output-dir", str(output), "--max-steps", "2", "--runs", "dense", "shapeshifter"]
    arguments += ["word2ketxs", "kpd", "--keep-rows", str(kept)]
    assert quality.main(arguments) == 0
    first = capsys.readouterr().out
    assert first.count(": done in") == 6
    rows = json.loads((output / "quality_rows.json").read_text())
    assert [(row["task"], row["run"]) for row in rows] == [
        ("translation", "dense"), ("translation", "shapeshifter"), ("cifar10", "dense"), ("cifar10", "kpd"),
        ("summarization", "dense"), ("summarization", "word2ketxs"),
    ]  # fmt: skip
    by_run = {(row["task"], row["run"]): row for row in rows}
    assert by_run["translation", "shapeshifter"]["fewer_than_dense"] > 5
    assert set(by_run["summarization", "dense"]["metrics"]) == {"test_rouge1", "test_rouge2", "test_rougeL"}
    assert by_run["cifar10", "kpd"]["kpd"]["inference_nonzeros"] > 0
    # summarization runs copy the emails' leads first, compressed, and fine-tune that checkpoint, still compressed
    for run in ("dense", "word2ketxs"):
        folder = Path(by_run["summarization", run]["folder"])
        assert by_run["summarization", run]["pretraining_steps"] == 2
        assert set(by_run["summarization", run]["pretraining_metrics"]) == {
            "validation_rouge1", "validation_rouge2", "validation_rougeL"
        }  # fmt: skip
        first = json.loads((folder / "pretraining" / "results.json").read_text())
        assert first["parameters"]["total"] == by_run["summarization", run]["parameters"]
    assert by_run["summarization", "word2ketxs"]["parameters"] < by_run["summarization", "dense"]["parameters"]
    copies = [json.loads(line) for line in gzip.open(output / "aeslc_lead_copies.jsonl.gz", "rt")]
    email = [json.loads(line) for line in gzip.open(data / "aeslc" / "train.jsonl.gz", "rt")][0]["document"]
    assert len(copies) == 40 and copies[0] == {"document": email, "subject": " ".join(email.split()[:12])}
    for row in rows:
        assert row["steps"] == 2 and row["best_step"] == 2 and row["validation"], row
        assert (Path(row["folder"]) / "train_log.jsonl").is_file()
        metric, best = next(iter(row["validation"].items()))
        assert row["curve"] == {"metric": f"validation_{metric}", "steps": [2], "values": [best]}, row
    table = (output / "quality_table.md").read_text()
    assert "| Shapeshifter (embedding rank 32, attention/FFN rank 16) |" in table and "Zhu et al., Table 3" in table
    assert "| 2 copy + 2 |" in table and "| 2 | 2 |" not in table.split("**summarization**")[1]

    assert quality.main(arguments) == 0  # resumed: every run has its results.json, nothing is trained
    assert ": done in" not in capsys.readouterr().out

    plots = tmp_path / "plots"
    assert load("plot_results").main([str(output), "--plots-dir", str(plots)]) == 0
    for name in ("quality_vs_parameters.png", "training_curves.png"):
        assert (plots / name).stat().st_size > 10_000

    # the kept rows are the same rows without their run folders, one file per task, and draw the same plots
    assert sorted(path.name for path in kept.iterdir()) == ["cifar10.json", "summarization.json", "translation.json"]
    kept_rows = load("plot_results").load_rows(kept)
    assert kept_rows == [{key: value for key, value in row.items() if key != "folder"} for row in sorted(
        rows, key=lambda row: ["cifar10", "summarization", "translation"].index(row["task"]))]  # fmt: skip
    assert load("plot_results").main([str(kept), "--plots-dir", str(tmp_path / "kept_plots")]) == 0
    assert (tmp_path / "kept_plots" / "training_curves.png").stat().st_size > 10_000

    # --runs limits what is trained, not the rows; --table trains nothing and keeps every finished run
    assert quality.main([str(data), "--output-dir", str(output), "--tasks", "translation", "--runs", "dense"]) == 0
    rows = json.loads((output / "quality_rows.json").read_text())
    assert [row["run"] for row in rows] == ["dense", "shapeshifter"]
    assert quality.main([str(data), "--output-dir", str(output), "--tasks", "cifar10", "--table"]) == 0
    assert ": done in" not in capsys.readouterr().out  # the cifar10 LowRank run is not trained
    rows = json.loads((output / "quality_rows.json").read_text())
    assert [row["run"] for row in rows] == ["dense", "kpd"]

    # a second seed trains in its own folder; both seeds are rows, and the table gives their spread
    seeds = [str(data), "--output-dir", str(output), "--tasks", "translation", "--runs", "dense", "--seeds", "42", "7"]
    assert quality.main([*seeds, "--max-steps", "2"]) == 0
    assert capsys.readouterr().out.count(": done in") == 1  # seed 42 is the finished run above
    rows = json.loads((output / "quality_rows.json").read_text())
    assert [(row["run"], row["seed"]) for row in rows] == [("dense", 42), ("dense", 7), ("shapeshifter", 42)]
    assert rows[1]["folder"] == str(output / "translation" / "dense_seed7")
    table = (output / "quality_table.md").read_text()
    assert "| dense (d_model 256, seed 7) |" in table
    assert "| translation | dense (d_model 256) | 42, 7 | bleu " in table

    # keeping rows again merges: the new seed joins the kept row of seed 42, in the runs' order
    assert quality.main([*seeds, "--table", "--keep-rows", str(kept)]) == 0
    translation = json.loads((kept / "translation.json").read_text())
    assert [(row["run"], row["seed"]) for row in translation] == [("dense", 42), ("dense", 7), ("shapeshifter", 42)]
    assert len(json.loads((kept / "cifar10.json").read_text())) == 2


def test_summarization_size_matched_runs(tmp_path):
    quality = load("quality")
    runs = {run.name: run for run in quality.summarization_runs(fake_data(tmp_path / "data"), tmp_path, 1.0, None)}
    copying = runs["dense_narrow"].pretraining
    settings = dict(item.split("=") for item in copying[copying.index("--config_overrides") + 1].split(","))
    narrow = quality.t5(quality.VOCAB, **{key: float(v) if "." in v else int(v) for key, v in settings.items()})
    assert settings["d_model"] == "80" and settings["d_ff"] == "320" and settings["num_layers"] == "2"
    # the narrow dense T5 has about rank 10's count (d_model a multiple of 8), and rank 40 has the narrow one's
    assert quality.parameters(narrow) == 999_616
    counts = {
        name: quality.compressed_parameters(quality.SUMMARY_T5, runs[name].compression)
        for name in ("word2ketxs", "word2ketxs_rank40")
    }
    assert counts["word2ketxs"] == 939_536 and counts["word2ketxs_rank40"] == 1_000_256
    assert runs["dense_narrow"].compression is None and "--config_overrides" not in runs["dense_narrow"].arguments


def test_rows_count_sizes_against_the_dense_run_of_any_seed(tmp_path):
    quality = load("quality")
    runs = {run.name: run for run in quality.summarization_runs(fake_data(tmp_path / "data"), tmp_path, 1.0, None)}
    finished = [runs["dense"].at_seed(46, tmp_path), runs["dense_narrow"].at_seed(42, tmp_path)]
    results = [
        {"parameters": {"total": total, "dense": total}, "metrics": {}, "steps": 4, "train_seconds": 1.0}
        for total in (1_943_296, 999_616)
    ]
    rows = quality.result_rows(finished, results)
    assert [row["fewer_than_dense"] for row in rows] == [1.0, 1_943_296 / 999_616]
    # without the task's dense run, a run is counted against its own model's dense size
    assert quality.result_rows(finished[1:], results[1:])[0]["fewer_than_dense"] == 1.0


def test_quality_names_an_unknown_run(tmp_path, capsys):
    data = fake_data(tmp_path / "data")
    with pytest.raises(SystemExit):
        load("quality").main([str(data), "--tasks", "cifar10", "--runs", "dense", "shapeshifter", "--table"])
    error = capsys.readouterr().err
    assert "--runs shapeshifter: no such run in cifar10; the runs are dense, kpd, kpd_l1_1e-3" in error


def test_plot_results_names_the_missing_rows(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load("plot_results").main([str(tmp_path)])
    error = capsys.readouterr().err
    assert f"{tmp_path}: no quality_rows.json and no kept rows (<task>.json) there (run benchmarks/quality.py" in error


def test_plot_labels_name_the_run_where_a_task_has_two_of_a_method_and_count_its_seeds():
    plot = load("plot_results")
    rows = [
        {"task": "translation", "run": "dense", "method": "dense", "note": "d_model 256"},
        {"task": "translation", "run": "dense", "method": "dense", "note": "d_model 256", "seed": 43},
        {"task": "translation", "run": "shapeshifter", "method": "Shapeshifter", "note": "embedding rank 32"},
        {"task": "translation", "run": "half", "method": "Shapeshifter", "note": "embedding rank 96", "seed": 43},
        {"task": "cifar10", "run": "shapeshifter", "method": "Shapeshifter", "note": "rank 4"},
    ]
    runs = {task: plot.runs_of(task, rows) for task in ("translation", "cifar10")}
    assert list(runs["translation"]) == ["dense", "shapeshifter", "half"] and list(runs["cifar10"]) == ["shapeshifter"]
    labels = [plot.run_label(seeds, rows) for task in runs for seeds in runs[task].values()]
    assert labels == [
        "dense, mean of 2 seeds", "Shapeshifter: embedding rank 32", "Shapeshifter: embedding rank 96, seed 43",
        "Shapeshifter",
    ]  # fmt: skip
    assert plot.run_label([rows[1]], rows) == "dense, seed 43"  # a seed drawn alone (the other has no curve)
    size_change = plot.size_change
    assert size_change(12.63) == "12.6x fewer" and size_change(1.0) == "1.0x fewer"
    assert size_change(1_943_296 / 1_963_536) == "1.01x more"  # word2ketXS with its head untied


def test_plot_colours_are_per_run_of_a_task():
    plot = load("plot_results")
    rows = [
        {"task": "translation", "run": "dense", "seed": 42},
        {"task": "translation", "run": "shapeshifter"},
        {"task": "translation", "run": "dense", "seed": 43},
        {"task": "cifar10", "run": "kpd"},
    ]
    colors = [plot.run_color(row["run"], row["task"], rows) for row in rows]
    assert colors == [plot.COLORS[0], plot.COLORS[1], plot.COLORS[0], plot.COLORS[0]]
    assert [plot.is_default_seed(row) for row in rows] == [True, True, False, True]


def test_mean_curve_ends_where_the_first_seed_stopped():
    curves = [
        {"steps": [500, 1000, 1500], "values": [2.0, 4.0, 9.0]},
        {"steps": [500, 1000], "values": [4.0, 5.0]},  # stopped early
        {"steps": [1000, 500, 1500], "values": [3.0, 6.0, 1.0]},  # order of the steps does not matter
    ]
    assert load("plot_results").mean_curve(curves) == ([500, 1000], [4.0, 4.0])


def test_write_whole_keeps_the_old_file_when_the_write_fails(tmp_path):
    quality = load("quality")
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(b"old")

    def half_write(temporary: Path) -> None:
        temporary.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        quality.write_whole(path, half_write)
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]
    quality.write_whole(path, lambda temporary: temporary.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [path]
