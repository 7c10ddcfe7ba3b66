"""Plots of ``benchmarks/quality.py``'s runs, from their rows alone (``quality_rows.json`` or kept rows).

    python benchmarks/plot_results.py outputs/quality [--plots-dir benchmarks/plots]
    python benchmarks/plot_results.py benchmarks/quality_rows    # the project's kept rows (quality.py --keep-rows)

Writes ``quality_vs_parameters.png`` (one panel per task: the test metric against parameters, log x, one marker
per method) and ``training_curves.png`` (one panel per task: the validation metric against optimizer steps, one
line per run, the restored best step marked). A run's seeds share its colour; the recipes' default seed is drawn
filled / solid, other seeds hollow / dashed.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


TASK_TITLES = {
    "translation": "Multi30k De-En (test BLEU)",
    "summarization": "AESLC (test ROUGE-L)",
    "cifar10": "CIFAR-10 (test accuracy %)",
}
MAIN_METRIC = {"translation": "test_bleu", "summarization": "test_rougeL", "cifar10": "test_accuracy"}
DEFAULT_SEED = 42  # the recipes' --seed default (quality.py's rows before --seeds have no "seed")
LEGEND_WIDTH = 60  # characters per legend line at fontsize 8 under a 5-inch panel
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
MARKERS = {"dense": "o", "dense (narrow)": "s", "Shapeshifter": "^", "word2ketXS": "^", "KPD": "^", "LowRank": "v"}


def run_label(row: dict, rows: list[dict]) -> str:
    """The method's name, with the run's note where another run of the task has the same method (other
    seeds of the same run do not count) and the seed where it is not the recipes' default."""
    twins = {other["run"] for other in rows if other["task"] == row["task"] and other["method"] == row["method"]}
    label = row["method"] if len(twins) == 1 else f"{row['method']}: {row['note']}"
    return label if is_default_seed(row) else f"{label}, seed {row['seed']}"


def run_color(row: dict, rows: list[dict]) -> str:
    """One colour per run of a task (its seeds share it), in the order the runs first appear."""
    runs = list(dict.fromkeys(other["run"] for other in rows if other["task"] == row["task"]))
    return COLORS[runs.index(row["run"]) % len(COLORS)]


def is_default_seed(row: dict) -> bool:
    return row.get("seed", DEFAULT_SEED) == DEFAULT_SEED


def legend_below(axis: plt.Axes) -> None:
    """The legend under the panel, its labels wrapped to the panel's width (long ones ran into the next panel's)."""
    handles, labels = axis.get_legend_handles_labels()
    labels = [textwrap.fill(label, LEGEND_WIDTH, subsequent_indent="  ") for label in labels]
    axis.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def size_change(fewer_than_dense: float) -> str:
    """``"12.6x fewer"``; a run larger than dense (an untied head) says ``"1.01x more"``."""
    return f"{fewer_than_dense:.1f}x fewer" if fewer_than_dense >= 1 else f"{1 / fewer_than_dense:.2f}x more"


def plot_quality(rows: list[dict], path: Path) -> None:
    tasks = [task for task in TASK_TITLES if any(row["task"] == task for row in rows)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for row in (row for row in rows if row["task"] == task):
            color = run_color(row, rows)
            axis.scatter(
                row["parameters"],
                row["metrics"][MAIN_METRIC[task]],
                marker=MARKERS.get(row["method"], "x"),
                s=70,
                edgecolors=color,
                facecolors=color if is_default_seed(row) else "none",
                linewidths=1.5,
                label=f"{run_label(row, rows)} ({size_change(row['fewer_than_dense'])})",
            )
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 200k, 500k, 1M, ...
        axis.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the default minor labels collide
        axis.set_xlabel("parameters")
        axis.set_title(TASK_TITLES[task])
        axis.grid(alpha=0.3)
        legend_below(axis)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_curves(rows: list[dict], path: Path) -> None:
    tasks = [task for task in TASK_TITLES if any(row["task"] == task for row in rows)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for row in (row for row in rows if row["task"] == task):
            curve = row.get("curve")
            if not curve or not curve["steps"]:
                continue  # a run without validations, or a row kept without its curve
            steps, scores = curve["steps"], curve["values"]
            axis.set_ylabel(curve["metric"].replace("_", " "))
            color = run_color(row, rows)
            style = "-" if is_default_seed(row) else "--"
            axis.plot(steps, scores, marker=".", color=color, linestyle=style, label=run_label(row, rows))
            if row.get("best_step") in steps:
                best = steps.index(row["best_step"])
                axis.scatter([steps[best]], [scores[best]], edgecolors=color, s=80, facecolors="none")
        axis.set_xlabel("optimizer steps")
        axis.set_title(TASK_TITLES[task].split(" (")[0])
        axis.grid(alpha=0.3)
        legend_below(axis)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def load_rows(source: Path) -> list[dict]:
    """``quality.py``'s rows: its ``--output-dir``'s ``quality_rows.json``, or the per-task files of a
    ``--keep-rows`` folder such as ``benchmarks/quality_rows``; ``[]`` where there are neither."""
    if (source / "quality_rows.json").is_file():
        return json.loads((source / "quality_rows.json").read_text())
    return [row for path in sorted(source.glob("*.json")) for row in json.loads(path.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", help="the --output-dir of benchmarks/quality.py, or a --keep-rows folder (benchmarks/quality_rows)"
    )
    parser.add_argument("--plots-dir", default=str(Path(__file__).parent / "plots"), help="where the PNGs go")
    args = parser.parse_args(argv)
    rows = load_rows(Path(args.source))
    if not rows:
        parser.error(
            f"{args.source}: no quality_rows.json and no kept rows (<task>.json) there (run benchmarks/quality.py "
            f"--output-dir {args.source}, or pass the folder of its --keep-rows)"
        )
    plots = Path(args.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    plot_quality(rows, plots / "quality_vs_parameters.png")
    plot_curves(rows, plots / "training_curves.png")
    print(f"wrote {plots / 'quality_vs_parameters.png'} and {plots / 'training_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
