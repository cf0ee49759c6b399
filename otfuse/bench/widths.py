"""``otfuse bench widths``: OTFusion with mixed client widths against all-wide and all-narrow runs.

Three federations train on the same IID shards of SST-2 with OTFusion (hard alignment, global
anchor), with several seeds:

* ``all-wide``: every client trains the global model (the default width);
* ``mixed``: ``client-width-factors = "1.0,0.5"``, so every second client trains a model of
  half the width (``d_model`` and ``d_ff``) and the server fuses it into the global width;
* ``all-narrow``: the global model itself has half the width, and so has every client: what
  a federation does without width support when its weakest client sets the size.

Each run is one ``otfuse run`` through :func:`otfuse.bench.federated.run_one`, and the
tables and the plot come from :mod:`otfuse.bench.report`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from otfuse.bench.config import ExperimentConfig
from otfuse.bench.federated import records_to_rows, run_one
from otfuse.bench.report import Column, leaderboard_table, plot_rounds, summarise
from otfuse.models import ModelConfig, parameter_shapes
from otfuse.models.widths import scaled_config

logger = logging.getLogger(__name__)

STRATEGY = "otfusion-hard"
#: Width factor of the narrow clients in ``mixed`` and of every model in ``all-narrow``.
NARROW_FACTOR = 0.5
VARIANTS: tuple[str, ...] = ("all-wide", "mixed", "all-narrow")
RESULTS_FILE = "results.md"
CSV_FILE = "widths.csv"
PLOT_FILE = "widths_rounds.png"
COLUMNS = (
    Column("accuracy", "accuracy"),
    Column("f1_weighted", "weighted F1"),
    Column("loss", "loss", lower_is_better=True),
)


@dataclass(frozen=True)
class WidthsSize:
    """Size of the experiment: clients, rounds, rows per client, test rows, model, seeds."""

    num_clients: int = 4
    rounds: int = 3
    train_rows: int = 400
    test_rows: int = 500
    seeds: tuple[int, ...] = (0, 1, 2)
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)


DEFAULT_SIZE = WidthsSize()
TINY_SIZE = WidthsSize(
    num_clients=2, rounds=2, train_rows=100, test_rows=100, seeds=(0,),
    model={"vocab_size": 512, "max_len": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32},
)


def variant_config(variant: str, size: WidthsSize) -> ExperimentConfig:
    """Return the federated experiment of one variant; the variants differ only in widths."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown widths variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    model = dict(size.model)
    run_config: dict[str, Any] = {}
    if variant == "mixed":
        run_config["client-width-factors"] = f"1.0,{NARROW_FACTOR}"
    elif variant == "all-narrow":
        narrow = scaled_config(ModelConfig.from_dict(model), NARROW_FACTOR)
        model.update(d_model=narrow.d_model, d_ff=narrow.d_ff)
    return ExperimentConfig(
        name=f"widths-{variant}",
        description=f"OTFusion with client widths {variant}.",
        datasets=("sst2",),
        num_parents=size.num_clients,
        partitioning="iid",
        seeds=size.seeds,
        max_train_examples=size.train_rows,
        max_test_examples=size.test_rows,
        model=model,
        epochs=1,
        modes=("federated",),
        federated={"rounds": size.rounds, "strategies": [STRATEGY], "run_config": run_config},
    )


def run_widths(out_dir: Path, size: WidthsSize = DEFAULT_SIZE, data_dir=None,
               command: str = "", machine: str = "") -> Path:
    """Run every variant and seed, write the CSV, the plot and ``results.md``; return its path.

    Finished runs under ``out_dir/<variant>`` are read instead of run again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in size.seeds:
        for variant in VARIANTS:
            config = variant_config(variant, size)
            logger.info("widths: %s, seed %d", variant, seed)
            records = run_one(config, STRATEGY, seed, out_dir / variant, data_dir)
            rows.extend(records_to_rows(records, variant, seed, _bytes_per_round(variant, size), 1))
    frame = pd.DataFrame(rows)
    frame.to_csv(out_dir / CSV_FILE, index=False)
    overall = frame[frame["test_set"] == "overall"]
    plot_rounds(overall, out_dir / PLOT_FILE, title="SST-2 test accuracy of the global model per round")
    path = out_dir / RESULTS_FILE
    path.write_text(results_markdown(frame, size, command, machine), encoding="utf-8")
    return path


def results_markdown(frame: pd.DataFrame, size: WidthsSize, command: str = "", machine: str = "") -> str:
    """Return the report: settings, the final-round table (mean ± std over seeds), the plot."""
    final = frame[(frame["round"] == frame["round"].max()) & (frame["test_set"] == "overall")]
    summary = summarise(final.rename(columns={"strategy": "variant"}), keys=("variant",),
                        metrics=("accuracy", "f1_weighted", "loss", "mb_sent_per_round"))
    summary["mb"] = summary["mb_sent_per_round_mean"].map(lambda value: f"{value:.2f}")
    model = ModelConfig.from_dict(dict(size.model))
    narrow = scaled_config(model, NARROW_FACTOR)
    lines = [
        "# Heterogeneous client widths",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        *([f"Machine: {machine}", ""] if machine else []),
        f"OTFusion (hard alignment, global anchor), {size.num_clients} clients on IID shards of "
        f"SST-2 with {size.train_rows} rows each, {size.rounds} rounds of 1 local epoch, "
        f"{len(size.seeds)} seed(s). Global width d_model={model.d_model}, d_ff={model.d_ff}; "
        f"narrow width d_model={narrow.d_model}, d_ff={narrow.d_ff}. `mixed` gives every second "
        "client the narrow width; `all-narrow` shrinks the global model and every client to it. "
        f"Scores of the global model after round {size.rounds} on {size.test_rows} SST-2 "
        "validation sentences, mean ± std over seeds; MB is the model arrays sent and received "
        "in the last round.",
        "",
        leaderboard_table(summary, "variant", COLUMNS, count_column="accuracy_count", extra={"mb": "MB"}),
        "",
        f"![rounds]({PLOT_FILE})",
        "",
    ]
    return "\n".join(lines)


def _bytes_per_round(variant: str, size: WidthsSize) -> float:
    # Only used when a record lacks measured bytes; the mixed variant's measured bytes are exact.
    model = ModelConfig.from_dict(dict(size.model))
    if variant == "all-narrow":
        model = scaled_config(model, NARROW_FACTOR)
    model_bytes = 4 * sum(_count(shape) for shape in parameter_shapes(model).values())
    return 2.0 * size.num_clients * model_bytes


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for dimension in shape:
        total *= dimension
    return total


__all__ = ["DEFAULT_SIZE", "TINY_SIZE", "VARIANTS", "WidthsSize", "results_markdown", "run_widths", "variant_config"]
