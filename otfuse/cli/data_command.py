"""``otfuse data``: inspect data sets and how a partitioning spreads them over the nodes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from otfuse.cli.errors import CommandError
from otfuse.data_partitions import (
    ALL_DATASETS,
    DATASET_NAMES,
    DEFAULT_ALPHA,
    PARTITIONINGS,
    SINGLE_LABEL,
    TASKS,
    DataError,
    label_names,
    load_partitions,
    partition_summary,
)
from otfuse.data_partitions.summary import LANGUAGES, MEAN_TOKENS, PARTITION, TEST_ROWS, TRAIN_ROWS

logger = logging.getLogger(__name__)

#: Chart width in inches per node, and its bounds, so that 2 or 100 nodes stay readable.
_INCHES_PER_NODE = 0.45
_MIN_WIDTH, _MAX_WIDTH, _HEIGHT = 6.0, 24.0, 4.5
# Console columns to measure a table's natural width in.
_UNBOUNDED_WIDTH = 10_000


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` subcommand and its ``describe`` command to the CLI."""
    parser = subparsers.add_parser("data", help="inspect data sets and partitions")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    describe = commands.add_parser(
        "describe",
        help="print each node's examples and label counts, and plot them",
        description=(
            "Partition the data as a run would, print one row per node (train and local test "
            "examples, languages, train examples per class, mean words per text) and write a "
            "PNG bar chart of the label counts per node."
        ),
    )

    describe.add_argument("--partitioning", choices=PARTITIONINGS, required=True, help="how the nodes split the data")
    describe.add_argument("--num-partitions", type=int, required=True, help="number of nodes")
    describe.add_argument("--datasets", nargs="+", choices=ALL_DATASETS, default=list(DATASET_NAMES),
                          help=f"data sets (default: {' '.join(DATASET_NAMES)})")
    describe.add_argument("--task", choices=TASKS, default=SINGLE_LABEL, help="label task (multi-label: XED only)")
    describe.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                          help=f"Dirichlet concentration for 'dirichlet'; smaller is more skewed (default {DEFAULT_ALPHA})")
    describe.add_argument("--size-skew", type=float, default=0.0,
                          help="for 'iid' and 'per-language': node j gets a share proportional to (j + 1) ** SIZE_SKEW (default 0, equal)")
    describe.add_argument("--size-weights", type=float, nargs="+", help="one positive size weight per node, instead of --size-skew")
    describe.add_argument("--min-examples", type=int, default=1, help="minimum examples per node; fewer is an error (default 1)")
    describe.add_argument("--languages", nargs="+", help="for 'per-language': languages in node order (default: those of --datasets)")
    describe.add_argument("--iid-dataset", choices=ALL_DATASETS,
                          help="corpus of 'iid', 'dirichlet' and 'kfold' (default: the first of --datasets)")
    describe.add_argument("--pool-datasets", action="store_true", help="split the union of --datasets instead of one corpus")

    describe.add_argument("--seed", type=int, default=0, help="seed of the shuffles and draws (default 0)")
    describe.add_argument("--max-train-examples", type=int, help="cap on each node's examples (default: none)")
    describe.add_argument("--local-test-fraction", type=float, default=0.1,
                          help="share of each node's examples held out for local testing (default 0.1)")

    describe.add_argument("--data-dir", type=Path, help="local Parquet data folder (default: $OTFUSE_DATA_DIR, else the Hub)")
    describe.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG chart (default: the current folder)")
    describe.set_defaults(handler=describe_command)


def describe_command(args: argparse.Namespace) -> int:
    """Print the per-node table and write the label chart; return the exit code."""
    try:
        clients = load_partitions(
            args.partitioning, args.num_partitions, datasets=args.datasets, data_dir=args.data_dir,
            seed=args.seed, max_train_examples=args.max_train_examples,
            local_test_fraction=args.local_test_fraction, iid_dataset=args.iid_dataset, task=args.task,
            alpha=args.alpha, size_skew=args.size_skew, size_weights=args.size_weights,
            min_examples=args.min_examples, languages=args.languages, pool_datasets=args.pool_datasets,
        )
    except DataError as error:
        raise CommandError(str(error)) from None
    classes = label_names(args.datasets[0])
    summary = partition_summary(clients, classes)
    headline, details = _title_lines(args)
    table = summary_table(summary, classes, f"{headline} ({details})")
    console = Console(highlight=False)
    # Rich shrinks a wide table to the console (80 columns in a pipe) and cuts the numbers.
    needed = Measurement.get(console, console.options.update_width(_UNBOUNDED_WIDTH), table).maximum
    if needed > console.width:
        console = Console(highlight=False, width=needed)
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    chart = args.out / f"labels-{args.partitioning}-{args.num_partitions}.png"
    plot_label_counts(summary, classes, f"{headline}\n{details}", chart)
    console.print(f"Label chart: {chart}")
    return 0


def summary_table(summary: pd.DataFrame, classes: tuple[str, ...], title: str) -> Table:
    """Render the per-node summary with each class's count and share of the node's train rows."""
    table = Table(title=title)
    for column in ("node", "train", "test", "lang"):
        table.add_column(column, justify="left" if column == "lang" else "right")
    for name in classes:
        table.add_column(name, justify="right")
    table.add_column("words/text", justify="right")
    for _, row in summary.iterrows():
        train = int(row[TRAIN_ROWS])
        cells = [str(row[PARTITION]), str(train), str(row[TEST_ROWS]), row[LANGUAGES]]
        cells += [_count_cell(int(row[name]), train) for name in classes]
        cells.append(f"{row[MEAN_TOKENS]:.1f}")
        table.add_row(*cells)
    return table


def plot_label_counts(summary: pd.DataFrame, classes: tuple[str, ...], title: str, path: Path) -> None:
    """Write a stacked bar chart of each node's train examples per class to ``path``."""
    # Figure without pyplot needs no GUI backend and keeps no global figure state.
    import matplotlib
    from matplotlib.figure import Figure

    width = min(max(_MIN_WIDTH, _INCHES_PER_NODE * len(summary)), _MAX_WIDTH)
    figure = Figure(figsize=(width, _HEIGHT), layout="constrained")
    axes = figure.add_subplot()
    positions = summary[PARTITION].to_numpy()
    bottom = pd.Series(0, index=summary.index, dtype="int64")
    colours = matplotlib.colormaps["tab10"]
    for index, name in enumerate(classes):
        axes.bar(positions, summary[name], bottom=bottom, label=name, color=colours(index % colours.N))
        bottom = bottom + summary[name]
    axes.set_xlabel("node (partition id)")
    axes.set_ylabel("train examples per class")
    axes.set_xticks(positions)
    axes.set_title(title, fontsize="medium")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    figure.savefig(path, dpi=120)
    logger.info("wrote %s", path)


def _count_cell(count: int, total: int) -> str:
    share = 100.0 * count / total if total else 0.0
    return f"{count} ({share:.0f}%)"


def _title_lines(args: argparse.Namespace) -> tuple[str, str]:
    details = [", ".join(args.datasets), args.task]
    if args.partitioning == "dirichlet":
        details.append(f"alpha {args.alpha:g}")
    if args.size_skew:
        details.append(f"size skew {args.size_skew:g}")
    if args.size_weights:
        details.append(f"size weights {' '.join(f'{w:g}' for w in args.size_weights)}")
    details.append(f"seed {args.seed}")
    return f"{args.partitioning} partitioning, {args.num_partitions} nodes", "; ".join(details)
