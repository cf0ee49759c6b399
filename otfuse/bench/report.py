"""Result tables and plots shared by every experiment: mean ± std over seeds, CSV, PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

METRICS = ("accuracy", "f1_weighted", "ece")
RELIABILITY_BINS = 15


def summarise(rows: pd.DataFrame, keys: Sequence[str] = ("test_set", "model"),
              metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Return mean, std and number of seeds of each metric per group of ``keys``."""
    grouped = rows.groupby(list(keys), sort=False)[list(metrics)]
    summary = grouped.agg(["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    return summary.reset_index()


def markdown_table(summary: pd.DataFrame, test_set: str, metrics: Sequence[str] = METRICS,
                   extra: Sequence[str] = ()) -> str:
    """Render one test set's rows as a Markdown table of ``mean ± std`` cells.

    The best mean of each metric is bold (highest, or lowest for ECE).
    """
    part = summary[summary["test_set"] == test_set]
    best = {}
    for metric in metrics:
        means = part[f"{metric}_mean"]
        best[metric] = means.min() if metric == "ece" else means.max()
    header = ["model", *metrics, "seeds", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in part.iterrows():
        cells = [str(row["model"])]
        for metric in metrics:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            text = f"{mean:.3f} ± {0.0 if np.isnan(std) else std:.3f}"
            cells.append(f"**{text}**" if np.isclose(mean, best[metric]) else text)
        cells.append(str(int(row[f"{metrics[0]}_count"])))
        cells.extend(str(row[column]) for column in extra)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Column:
    """One metric column of :func:`leaderboard_table`.

    ``metric`` names the ``<metric>_mean`` and ``<metric>_std`` columns of the summary,
    ``title`` heads the column, ``decimals`` rounds both numbers, and ``lower_is_better``
    marks the lowest mean as best instead of the highest.
    """

    metric: str
    title: str
    decimals: int = 3
    lower_is_better: bool = False


def leaderboard_table(summary: pd.DataFrame, label: str, columns: Sequence[Column],
                      count_column: str | None = None, extra: Mapping[str, str] | None = None) -> str:
    """Render ``summary`` (one row per ``label``) as Markdown ``mean ± std`` cells, best in bold.

    Every column marks the best mean, the highest or, with ``lower_is_better``, the lowest;
    ties at the printed precision are all bold. Rows whose mean is NaN show a dash and are
    never best. ``extra`` maps summary columns to titles of plain text columns that follow.
    With ``count_column``, a last column gives that summary column's value (the number of
    seeds).
    """
    extra = dict(extra or {})
    header = [label, *(column.title for column in columns), *extra.values()]
    header += ["seeds"] if count_column else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {}
    for column in columns:
        means = summary[f"{column.metric}_mean"].astype(float)
        best[column.metric] = means.min() if column.lower_is_better else means.max()
    for _, row in summary.iterrows():
        cells = [str(row[label])]
        for column in columns:
            cells.append(_leaderboard_cell(row, column, best[column.metric]))
        cells.extend(str(row[name]) for name in extra)
        if count_column:
            cells.append(str(int(row[count_column])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _leaderboard_cell(row: pd.Series, column: Column, best: float) -> str:
    mean = float(row[f"{column.metric}_mean"])
    if np.isnan(mean):
        return "–"
    std = float(row[f"{column.metric}_std"])
    text = f"{mean:.{column.decimals}f} ± {0.0 if np.isnan(std) else std:.{column.decimals}f}"
    # Compare at the printed precision, so that cells that read the same are both marked.
    if round(mean, column.decimals) == round(best, column.decimals):
        return f"**{text}**"
    return text


def plot_bars(summary: pd.DataFrame, path: Path, metric: str = "accuracy", title: str = "",
              log_scale: bool = False) -> Path:
    """Bar chart of ``metric`` per model, one group of bars per test set, with std error bars.

    ``log_scale`` puts the value axis on a log scale, for metrics that span decades; it
    needs a positive mean, so without one the axis stays linear.
    """
    test_sets = list(dict.fromkeys(summary["test_set"]))
    models = list(dict.fromkeys(summary["model"]))
    width = 0.8 / max(len(models), 1)
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(test_sets) * len(models) / 2), 4))
    for index, model in enumerate(models):
        part = summary[summary["model"] == model].set_index("test_set").reindex(test_sets)
        positions = np.arange(len(test_sets)) + index * width
        axes.bar(positions, part[f"{metric}_mean"], width, yerr=part[f"{metric}_std"].fillna(0), label=model)
    axes.set_xticks(np.arange(len(test_sets)) + width * (len(models) - 1) / 2, test_sets)
    axes.set_ylabel(metric)
    if log_scale and (summary[f"{metric}_mean"] > 0).any():
        axes.set_yscale("log")
    else:
        low = np.nanmin(summary[f"{metric}_mean"]) if metric != "ece" else 0.0
        axes.set_ylim(max(0.0, low - 0.1), None)
    axes.set_title(title or metric)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_reliability(probabilities: Mapping[str, np.ndarray], labels: np.ndarray, path: Path,
                     title: str = "reliability", bins: int = RELIABILITY_BINS) -> Path:
    """Reliability diagram: accuracy against confidence in equal-width bins, one line per model."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, probs in probabilities.items():
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        centres, accuracies = [], []
        for low, high in zip(edges[:-1], edges[1:]):
            inside = (confidence > low) & (confidence <= high)
            if inside.any():
                centres.append(confidence[inside].mean())
                accuracies.append(correct[inside].mean())
        axes.plot(centres, accuracies, marker="o", markersize=3, label=name)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_rounds(rounds: pd.DataFrame, path: Path, metric: str = "accuracy", title: str = "") -> Path:
    """Line plot of ``metric`` per round, one line per strategy, mean over seeds with a std band."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for strategy, part in rounds.groupby("strategy", sort=False):
        stats = part.groupby("round")[metric].agg(["mean", "std"]).fillna(0.0)
        axes.plot(stats.index, stats["mean"], marker="o", label=strategy)
        axes.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
    axes.set_xlabel("round")
    axes.set_ylabel(metric)
    axes.set_title(title or metric)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
