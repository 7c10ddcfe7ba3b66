"""Plots of ``benchmarks/quality.py``'s runs, from their rows alone (``quality_rows.json`` or kept rows).

    python benchmarks/plot_results.py outputs/quality [--plots-dir benchmarks/plots]
    python benchmarks/plot_results.py benchmarks/quality_rows    # the project's kept rows (quality.py --keep-rows)

Writes ``quality_vs_parameters.png`` (one panel per task: the test metric against parameters, log x, one marker
per run) and ``training_curves.png`` (one panel per task: the validation metric against optimizer steps, one
line per run). One legend entry per run; a run of several seeds is drawn small / thin per seed and large / thick
at their mean, in one colour.
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


def runs_of(task: str, rows: list[dict]) -> dict[str, list[dict]]:
    """The task's rows by run (a run's seeds together), in the order the runs first appear."""
    runs: dict[str, list[dict]] = {}
    for row in rows:
        if row["task"] == task:
            runs.setdefault(row["run"], []).append(row)
    return runs


def run_label(seeds: list[dict], rows: list[dict]) -> str:
    """The method's name, with the run's note where another run of the task has the same method; then how many
    seeds the run has, or its one seed where that is not the recipes' default."""
    first = seeds[0]
    twins = {other["run"] for other in rows if other["task"] == first["task"] and other["method"] == first["method"]}
    label = first["method"] if len(twins) == 1 else f"{first['method']}: {first['note']}"
    if len(seeds) > 1:
        return f"{label}, mean of {len(seeds)} seeds"
    return label if is_default_seed(first) else f"{label}, seed {first['seed']}"


def run_color(run: str, task: str, rows: list[dict]) -> str:
    """One colour per run of a task (its seeds share it), in the order the runs first appear."""
    return COLORS[list(runs_of(task, rows)).index(run) % len(COLORS)]


def is_default_seed(row: dict) -> bool:
    return row.get("seed", DEFAULT_SEED) == DEFAULT_SEED


def has_curve(row: dict) -> bool:
    """Whether the row has validations to draw (not a run without them, nor a row transcribed without its curve)."""
    return bool(row.get("curve") and row["curve"]["steps"])


def mean_curve(curves: list[dict]) -> tuple[list[int], list[float]]:
    """The steps every curve reached (an early-stopped seed ends its run's mean) and the mean there."""
    steps = sorted(set.intersection(*(set(curve["steps"]) for curve in curves)))
    means = [sum(curve["values"][curve["steps"].index(step)] for curve in curves) / len(curves) for step in steps]
    return steps, means


def legend_below(axis: plt.Axes) -> None:
    """The legend under the panel, its labels wrapped to the panel's width (long ones ran into the next panel's)."""
    handles, labels = axis.get_legend_handles_labels()
    labels = [textwrap.fill(label, LEGEND_WIDTH, subsequent_indent="  ") for label in labels]
    axis.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def size_change(fewer_than_dense: float) -> str:
    """``"12.6x fewer"``; a run larger than dense (an untied head) says ``"1.01x more"``."""
    return f"{fewer_than_dense:.1f}x fewer" if fewer_than_dense >= 1 else f"{1 / fewer_than_dense:.2f}x more"


def plot_quality(rows: list[dict], path: Path) -> None:
    """A run of one seed is one filled marker; a run of several is a small hollow marker per seed and a large
    filled one at their mean."""
    tasks = [task for task in TASK_TITLES if any(row["task"] == task for row in rows)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for run, seeds in runs_of(task, rows).items():
            color, marker = run_color(run, task, rows), MARKERS.get(seeds[0]["method"], "x")
            scores = [row["metrics"][MAIN_METRIC[task]] for row in seeds]
            if len(seeds) > 1:
                axis.scatter([row["parameters"] for row in seeds], scores, marker=marker, s=25, edgecolors=color,
                             facecolors="none", linewidths=1, alpha=0.7)  # fmt: skip
            axis.scatter(
                seeds[0]["parameters"],
                sum(scores) / len(scores),
                marker=marker,
                s=80,
                color=color,
                label=f"{run_label(seeds, rows)} ({size_change(seeds[0]['fewer_than_dense'])})",
            )
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 200k, 500k, 1M, ...
        axis.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))  # "700k": close ticks stay apart
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the default minor labels collide
        axis.set_xlabel("parameters")
        axis.set_title(TASK_TITLES[task])
        axis.grid(alpha=0.3)
        legend_below(axis)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_curves(rows: list[dict], path: Path) -> None:
    """A run of one seed is one line with its restored best step circled; a run of several is a thin line per
    seed and a thick one at their mean (``mean_curve``). Tasks without curves get no panel."""
    tasks = [task for task in TASK_TITLES if any(row["task"] == task and has_curve(row) for row in rows)]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for run, seeds in runs_of(task, rows).items():
            drawn = [row for row in seeds if has_curve(row)]
            if not drawn:
                continue
            color = run_color(run, task, rows)
            axis.set_ylabel(drawn[0]["curve"]["metric"].replace("_", " "))
            if len(drawn) == 1:
                steps, scores = drawn[0]["curve"]["steps"], drawn[0]["curve"]["values"]
                axis.plot(steps, scores, marker=".", color=color, label=run_label(drawn, rows))
                if drawn[0].get("best_step") in steps:
                    best = steps.index(drawn[0]["best_step"])
                    axis.scatter([steps[best]], [scores[best]], edgecolors=color, s=80, facecolors="none")
                continue
            for row in drawn:
                axis.plot(row["curve"]["steps"], row["curve"]["values"], color=color, linewidth=0.8, alpha=0.35)
            axis.plot(*mean_curve([row["curve"] for row in drawn]), marker=".", color=color, linewidth=2,
                      label=run_label(drawn, rows))  # fmt: skip
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
    print(f"wrote {plots / 'quality_vs_parameters.png'}")
    if any(has_curve(row) for row in rows):
        plot_curves(rows, plots / "training_curves.png")
        print(f"wrote {plots / 'training_curves.png'}")
    else:
        print("no row has a validation curve: no training_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
