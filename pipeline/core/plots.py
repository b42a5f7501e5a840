"""PNG plots for people who would rather look than read: loss curves, per-task bars, confusion.

Each function reads plain data and writes one PNG with matplotlib's non-interactive
backend; DVC declares the PNGs as plots and MLflow stores them as artifacts.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_curve(path: Path) -> tuple[list[float], list[float]]:
    if not path.exists():
        return [], []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [float(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def loss_curve(train_csv: Path, val_csv: Path, out: Path) -> None:
    """Train loss per step and validation loss at each validation run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for path, label, style in ((train_csv, "train", "-"), (val_csv, "val", "o-")):
        steps, losses = _read_curve(path)
        if steps:
            ax.plot(steps, losses, style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def task_bars(scores: Mapping[str, Mapping[str, Sequence[float]]], metric_names: Mapping[str, str], out: Path) -> None:
    """Grouped bars per task, one bar per model, with 95% bootstrap intervals.

    ``scores[model][task] = (point, low, high)``; ``metric_names[task]`` labels the axis.
    """
    plt = _pyplot()
    models = list(scores)
    tasks = sorted({t for m in models for t in scores[m]})
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 4))
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(tasks))]
        # A model that did not score a task (the encoder on generation tasks) leaves its slot empty.
        kept = [(x, scores[model][t]) for x, t in zip(xs, tasks) if t in scores[model]]
        pts = [p for _, p in kept]
        ax.bar([x for x, _ in kept], [p[0] for p in pts], width, label=model,
               yerr=[[p[0] - p[1] for p in pts], [p[2] - p[0] for p in pts]], capsize=3)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({metric_names.get(t, '')})" for t in tasks])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95% bootstrap CI)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str, out: Path) -> None:
    """Confusion matrix with counts in the cells (rows: reference, columns: prediction)."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 * n + 2, 1.0 * n + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def length_histograms(lengths: Mapping[str, Sequence[int]], xlabel: str, out: Path,
                      limit: int | None = None) -> None:
    """Overlaid histograms of lengths, one per split; ``limit`` draws the max-length line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    every = [n for values in lengths.values() for n in values]
    bins = min(40, max(every) - min(every) + 1) if every else 1
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, range=(min(every), max(every) + 1), alpha=0.5, label=f"{name} ({len(values)})")
    if limit is not None:
        ax.axvline(limit, color="red", linestyle="--", label=f"max_length={limit}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
