"""Run an experiment in its configured modes and write its tables, CSV files and plots."""

from __future__ import annotations

import logging
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.progress import Progress

from otfuse.bench.config import ExperimentConfig
from otfuse.bench.oneshot import OVERALL, run_seed
from otfuse.bench.report import markdown_table, plot_bars, plot_reliability, summarise

logger = logging.getLogger(__name__)


def machine_description() -> str:
    """Describe this machine for result headers: CPU count, architecture and Python version."""
    import os

    return f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"


def run_oneshot_mode(config: ExperimentConfig, out_dir: Path, data_dir=None, show_progress: bool = True) -> pd.DataFrame:
    """Run every seed one-shot, write ``oneshot.csv``, the tables and plots; return the rows."""
    steps_per_seed = (config.num_parents + int(config.centralised) + len(config.variants)
                      + len(config.finetune_variants))
    rows, first = [], None
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task(f"{config.name} one-shot", total=steps_per_seed * len(config.seeds))
        for seed in config.seeds:
            result = run_seed(config, seed, data_dir, advance=lambda _step: progress.advance(task))
            rows.extend(result.rows)
            first = first or result
    frame = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "oneshot.csv", index=False)
    summary = summarise(frame)
    plot_bars(summary, out_dir / "oneshot_accuracy.png", title=f"{config.name}: accuracy (mean ± std over seeds)")
    if first is not None:
        fused_names = [name for name in first.probabilities[OVERALL] if name != "centralised"]
        plot_reliability({name: first.probabilities[OVERALL][name] for name in fused_names},
                         first.labels[OVERALL], out_dir / "oneshot_reliability.png",
                         title=f"{config.name}: reliability, seed {config.seeds[0]}, all test sets")
    return frame


def write_report(config: ExperimentConfig, out_dir: Path, oneshot: pd.DataFrame | None,
                 federated_sections: list[str] | None = None) -> Path:
    """Write ``results.md``: the command, date, machine, and one table per test set."""
    command = "otfuse " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]) if sys.argv[1:] else "(Python API)"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Experiment `{config.name}`",
        "",
        config.description.strip(),
        "",
        f"Command: `{command}`. Date: {stamp}. Machine: {machine_description()}.",
        f"Seeds: {', '.join(map(str, config.seeds))}. Every cell is mean ± std over seeds; the best mean is bold.",
    ]
    if oneshot is not None:
        summary = summarise(oneshot)
        lines += ["", "## One-shot fusion", ""]
        for test_set in dict.fromkeys(summary["test_set"]):
            lines += [f"### Test set: {test_set}", "", markdown_table(summary, test_set), ""]
        lines += ["![accuracy](oneshot_accuracy.png)", "", "![reliability](oneshot_reliability.png)", ""]
    for section in federated_sections or []:
        lines += ["", section]
    path = out_dir / "results.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_overrides(config: ExperimentConfig) -> dict[str, object]:
    """Settings that shrink an experiment to a smoke test of a minute or two on 2 cores."""
    return {
        "seeds": (0, 1),
        "max_train_examples": 200,
        "max_test_examples": 100,
        "epochs": 1,
        "finetune_examples": 64,
        "model": {**dict(config.model), "vocab_size": 2048, "max_len": 32, "d_model": 32, "d_ff": 64, "n_layers": 1},
        "federated": {**dict(config.federated), "rounds": 2},
    }


def run_experiment(config: ExperimentConfig, out_dir: Path, data_dir=None,
                   modes: tuple[str, ...] | None = None, show_progress: bool = True) -> Path:
    """Run ``config`` in ``modes`` (default: the config's own) and return the report's path."""
    modes = modes or config.modes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    oneshot = run_oneshot_mode(config, out_dir, data_dir, show_progress) if "oneshot" in modes else None
    federated_sections = []
    if "federated" in modes:
        from otfuse.bench.federated import run_federated_mode

        federated_sections.append(run_federated_mode(config, out_dir, data_dir, show_progress))
    return write_report(config, out_dir, oneshot, federated_sections)
