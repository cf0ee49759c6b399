"""Strategy benchmark: OT fusion against Flower's strategies on every partitioning.

The matrix runs every strategy on every partition case with several seeds. Each run is one
``otfuse run`` (a local SuperLink and a Ray simulation) through
:func:`otfuse.bench.federated.run_one`, so a run that already finished in the output folder
is read instead of run again. The results are a CSV of every round of every run, a CSV of
one row per run, Markdown leaderboards (mean ± std over seeds, best per column in bold) and
plots.
"""

from __future__ import annotations

import logging
import math
import platform
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from otfuse.bench.config import ExperimentConfig
from otfuse.bench.federated import STRATEGIES, records_to_rows, run_one
from otfuse.bench.report import Column, leaderboard_table, plot_bars, plot_rounds, summarise

logger = logging.getLogger(__name__)

OVERALL = "overall"
ROUNDS_FILE = "rounds.csv"
RUNS_FILE = "runs.csv"
REPORT_FILE = "results.md"
BASELINE = "fedavg"
#: Failed runs in a row after which the benchmark stops, because the cause is then likely
#: shared (a missing executable, a full disk) and every further run would fail the same way.
MAX_CONSECUTIVE_FAILURES = 3


@dataclass(frozen=True)
class PartitionCase:
    """One partitioning of the matrix with its own clients and target accuracy.

    ``target_accuracy`` is the global test accuracy (all test sets together) whose first
    round is reported as "rounds to target".
    """

    name: str
    partitioning: str
    datasets: tuple[str, ...]
    num_clients: int
    target_accuracy: float
    description: str
    partition_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MatrixSize:
    """Settings that every run of the matrix shares."""

    seeds: tuple[int, ...]
    rounds: int
    max_train_examples: int
    max_test_examples: int
    epochs: int
    batch_size: int
    lr: float
    model: Mapping[str, Any]


#: The strategies of the default matrix, by their names in :data:`otfuse.bench.federated.STRATEGIES`.
DEFAULT_STRATEGIES: tuple[str, ...] = (
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg",
    "otfusion-hard", "otfusion-soft", "otfusion-client",
)
QUICK_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "otfusion-hard")

# Each target is about the global accuracy that FedAvg reached within the default size in an
# in-process trial with seed 0 (8 rounds of 2 local epochs), so it separates strategies that
# learn slower. The largest class is 51.5 % of the SST-2 test rows, 51 % of the three
# sentiment test sets together and 15 % of the XED test rows.
CASES: tuple[PartitionCase, ...] = (
    PartitionCase(
        name="iid", partitioning="iid", datasets=("sst2",), num_clients=4, target_accuracy=0.64,
        description="SST-2 cut into equal random shards",
    ),
    PartitionCase(
        name="dirichlet-0.1", partitioning="dirichlet", datasets=("sst2",), num_clients=4,
        target_accuracy=0.60, partition_options={"alpha": 0.1},
        description="SST-2 with strong label skew: class shares per node from Dirichlet(0.1)",
    ),
    PartitionCase(
        name="dirichlet-1.0", partitioning="dirichlet", datasets=("sst2",), num_clients=4,
        target_accuracy=0.60, partition_options={"alpha": 1.0},
        description="SST-2 with mild label skew: class shares per node from Dirichlet(1.0)",
    ),
    PartitionCase(
        name="per-dataset", partitioning="per-dataset", datasets=("sst2", "imdb", "sentiment140"),
        num_clients=3, target_accuracy=0.62,
        description="one node per data set: SST-2, IMDB and Sentiment140",
    ),
    PartitionCase(
        name="per-language", partitioning="per-language", datasets=("xed-en", "xed-fi"), num_clients=4,
        target_accuracy=0.25,
        description="XED emotions (8 classes), two English and two Finnish nodes",
    ),
)
QUICK_CASES: tuple[str, ...] = ("iid", "dirichlet-0.1")

DEFAULT_SIZE = MatrixSize(
    seeds=(0, 1, 2), rounds=8, max_train_examples=600, max_test_examples=400, epochs=2,
    batch_size=32, lr=3e-3,
    model={"vocab_size": 4096, "max_len": 48, "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64},
)
QUICK_SIZE = replace(DEFAULT_SIZE, seeds=(0,), rounds=3, max_train_examples=300, max_test_examples=200)


@dataclass(frozen=True)
class Matrix:
    """The cases, strategies and sizes of one benchmark invocation."""

    cases: tuple[PartitionCase, ...]
    strategies: tuple[str, ...]
    size: MatrixSize

    @property
    def num_runs(self) -> int:
        return len(self.cases) * len(self.strategies) * len(self.size.seeds)


def build_matrix(*, quick: bool = False, seeds: Sequence[int] | None = None,
                 strategies: Sequence[str] | None = None, cases: Sequence[str] | None = None,
                 rounds: int | None = None) -> Matrix:
    """Return the default or ``quick`` matrix, narrowed or resized by the other arguments.

    Raises
    ------
    ValueError
        For an unknown strategy or case name, no seeds, or fewer than 1 round.
    """
    size = QUICK_SIZE if quick else DEFAULT_SIZE
    if seeds is not None:
        if not seeds:
            raise ValueError("seeds is empty; give at least one seed, for example --seeds 0 1 2")
        size = replace(size, seeds=tuple(seeds))
    if rounds is not None:
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        size = replace(size, rounds=rounds)
    if strategies:
        strategy_names = tuple(strategies)
    else:
        strategy_names = QUICK_STRATEGIES if quick else DEFAULT_STRATEGIES
    unknown = [name for name in strategy_names if name not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    by_name = {case.name: case for case in CASES}
    if cases:
        case_names = tuple(cases)
    else:
        case_names = QUICK_CASES if quick else tuple(by_name)
    unknown = [name for name in case_names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown partition case {unknown[0]!r}; choose from {', '.join(by_name)}")
    return Matrix(cases=tuple(by_name[name] for name in case_names), strategies=strategy_names, size=size)


def experiment_config(case: PartitionCase, size: MatrixSize, strategies: Sequence[str]) -> ExperimentConfig:
    """Return the experiment config that :func:`~otfuse.bench.federated.run_one` takes for ``case``."""
    return ExperimentConfig(
        name=case.name,
        description=case.description,
        datasets=case.datasets,
        num_parents=case.num_clients,
        partitioning=case.partitioning,
        partition_options=dict(case.partition_options),
        seeds=size.seeds,
        max_train_examples=size.max_train_examples,
        max_test_examples=size.max_test_examples,
        model=dict(size.model),
        epochs=size.epochs,
        batch_size=size.batch_size,
        lr=size.lr,
        centralised=False,
        modes=("federated",),
        federated={"rounds": size.rounds, "strategies": list(strategies)},
    )


RunHook = Callable[[PartitionCase, str, int], None]


@dataclass
class MatrixResult:
    """Rows of every finished run (one per round and test set) and the runs that failed."""

    rounds: pd.DataFrame
    failures: list[str] = field(default_factory=list)


def run_matrix(matrix: Matrix, out_dir: Path, data_dir=None, *, ray_address: str | None = None,
               show_progress: bool = True, on_run: RunHook | None = None, jobs: int = 1) -> MatrixResult:
    """Run (or read) every run of ``matrix`` and return the rows of the finished ones.

    Runs go to ``out_dir/<case>/federated/<strategy>-seed<seed>``; finished ones are read.
    Seeds form the outer loop, so an interrupted benchmark has every case and strategy for
    its first seeds. A run that fails is logged, listed in the result and left out; the
    next invocation runs it again. After :data:`MAX_CONSECUTIVE_FAILURES` failures in a row
    the benchmark stops with the last error. ``on_run`` is called before each run with its
    case, strategy and seed. ``jobs`` above 1 runs that many simulations at once, each as
    an ``otfuse run`` child process. A simulation leaves a core mostly idle while Flower and
    Ray start and pass messages, so 2 or 3 jobs finish sooner on two cores. The timings get
    noisier.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if jobs < 1:
        raise ValueError(f"jobs={jobs} is invalid; give 1 or more parallel runs")
    tasks = [
        (case, strategy, seed)
        for seed in matrix.size.seeds
        for case in matrix.cases
        for strategy in matrix.strategies
    ]
    configs = {case.name: experiment_config(case, matrix.size, matrix.strategies) for case in matrix.cases}
    tracker = _FailureTracker()
    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        bar = progress.add_task("strategy benchmark", total=len(tasks))

        def finish(case: PartitionCase, strategy: str, seed: int, outcome: list | Exception) -> None:
            if isinstance(outcome, Exception):
                tracker.failed(f"{case.name} {strategy} seed {seed}", outcome)
            else:
                tracker.succeeded()
                for row in records_to_rows(outcome, strategy, seed, 0.0, matrix.size.epochs):
                    rows.append({"partitioning": case.name, **row})
            progress.advance(bar)

        if jobs == 1:
            for case, strategy, seed in tasks:
                progress.update(bar, description=f"{case.name} {strategy} seed {seed}")
                if on_run is not None:
                    on_run(case, strategy, seed)
                finish(case, strategy, seed, _attempt(
                    lambda: run_one(configs[case.name], strategy, seed, out_dir / case.name, data_dir,
                                    ray_address=ray_address)))
        else:
            _run_parallel(tasks, configs, out_dir, data_dir, ray_address, jobs, on_run, finish, progress, bar)
    return MatrixResult(pd.DataFrame(rows), tracker.failures)


class _FailureTracker:
    """Failed runs of a matrix, and the stop after too many failures in a row."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.consecutive = 0

    def succeeded(self) -> None:
        self.consecutive = 0

    def failed(self, label: str, error: Exception) -> None:
        from otfuse.cli.errors import CommandError

        if isinstance(error, CommandError) and error.exit_code != 1:
            raise error  # terminated by a signal
        self.failures.append(f"{label}: {error}")
        logger.error("run %s failed and is left out: %s", label, error)
        self.consecutive += 1
        if self.consecutive >= MAX_CONSECUTIVE_FAILURES:
            raise CommandError(
                f"{self.consecutive} runs in a row failed, the last with: {error}; fix "
                "the cause and run the command again, which keeps the finished runs"
            ) from error


def _attempt(run: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]] | Exception:
    """Return the records of ``run``, or the expected error that it raised."""
    from otfuse.cli.errors import CommandError
    from otfuse.data_partitions import DataError

    try:
        return run()
    except (CommandError, DataError) as error:
        return error


def _run_parallel(tasks, configs, out_dir, data_dir, ray_address, jobs, on_run, finish, progress, bar) -> None:
    """Run ``tasks`` as ``jobs`` child processes at a time; stop every child on an error."""
    import signal
    import threading
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from otfuse.bench.federated import run_one_process

    children: set = set()
    lock = threading.Lock()

    def started(process) -> None:
        with lock:
            children.add(process)

    def work(case, strategy, seed):
        return _attempt(lambda: run_one_process(
            configs[case.name], strategy, seed, out_dir / case.name, data_dir,
            ray_address=ray_address, on_start=started))

    pending_tasks = list(tasks)
    running = {}
    executor = ThreadPoolExecutor(max_workers=jobs)
    try:
        while pending_tasks or running:
            while pending_tasks and len(running) < jobs:
                case, strategy, seed = pending_tasks.pop(0)
                if on_run is not None:
                    on_run(case, strategy, seed)
                running[executor.submit(work, case, strategy, seed)] = (case, strategy, seed)
            progress.update(bar, description=f"{len(running)} runs in parallel")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                case, strategy, seed = running.pop(future)
                finish(case, strategy, seed, future.result())
    except BaseException:
        # SIGTERM, Ctrl-C or too many failures: each child's own handler stops its SuperLink.
        with lock:
            for process in children:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def run_summaries(rounds: pd.DataFrame, cases: Sequence[PartitionCase]) -> pd.DataFrame:
    """Reduce the per-round rows to one row per run (partitioning, strategy, seed).

    Scores are those of the last round on all test sets together. Costs are means over the
    federated rounds (round 0 is the initial model). ``aggregation_ratio`` divides the
    run's mean aggregation seconds by FedAvg's from the same partitioning and seed (NaN
    without a FedAvg run).
    """
    targets = {case.name: case.target_accuracy for case in cases}
    overall = rounds[rounds["test_set"] == OVERALL]
    runs = []
    for (partitioning, strategy, seed), part in overall.groupby(["partitioning", "strategy", "seed"], sort=False):
        part = part.sort_values("round")
        final = part.iloc[-1]
        federated = part[part["round"] > 0]
        runs.append({
            "partitioning": partitioning,
            "strategy": strategy,
            "seed": seed,
            "rounds": int(final["round"]),
            "accuracy": final["accuracy"],
            "f1_weighted": final["f1_weighted"],
            "ece": final["ece"],
            "rounds_to_target": rounds_to_target(part, targets.get(partitioning, math.inf)),
            "mb_per_round": federated["mb_sent_per_round"].mean(),
            "client_train_seconds": federated["client_train_seconds"].mean(),
            "aggregation_seconds": federated["aggregation_seconds"].mean(),
            "round_seconds": federated["round_seconds"].mean(),
        })
    frame = pd.DataFrame(runs)
    baseline = frame[frame["strategy"] == BASELINE].set_index(["partitioning", "seed"])["aggregation_seconds"]
    keys = list(zip(frame["partitioning"], frame["seed"]))
    frame["aggregation_ratio"] = [
        row_seconds / baseline[key] if key in baseline.index else np.nan
        for row_seconds, key in zip(frame["aggregation_seconds"], keys)
    ]
    return frame


def rounds_to_target(run_rounds: pd.DataFrame, target: float) -> float:
    """Return the first round whose accuracy reaches ``target``, or NaN if none does."""
    reached = run_rounds[(run_rounds["round"] > 0) & (run_rounds["accuracy"] >= target)]
    return float(reached["round"].min()) if len(reached) else float("nan")


#: Columns of the per-partitioning leaderboards.
LEADERBOARD_COLUMNS: tuple[Column, ...] = (
    Column("accuracy", "accuracy"),
    Column("f1_weighted", "weighted F1"),
    Column("ece", "ECE", lower_is_better=True),
    Column("rounds_to_target", "rounds to target", decimals=1, lower_is_better=True),
    Column("mb_per_round", "MB per round", decimals=2, lower_is_better=True),
    Column("client_train_seconds", "client train s", decimals=2, lower_is_better=True),
    Column("aggregation_seconds", "aggregation s", decimals=4, lower_is_better=True),
    Column("aggregation_ratio", "aggregation / FedAvg", decimals=1, lower_is_better=True),
)
SUMMARY_METRICS = tuple(column.metric for column in LEADERBOARD_COLUMNS) + ("round_seconds",)


def summarise_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Return mean, std and count over seeds per partitioning and strategy.

    ``rounds_to_target`` is averaged only where every seed reached the target, so a
    strategy that reached it in some seeds shows no mean; ``reached`` counts the seeds that did.
    """
    summary = summarise(runs, keys=("partitioning", "strategy"), metrics=SUMMARY_METRICS)
    reached = runs.groupby(["partitioning", "strategy"], sort=False)["rounds_to_target"].agg(
        lambda values: f"{int(values.notna().sum())}/{len(values)}"
    )
    summary["reached"] = [reached[key] for key in zip(summary["partitioning"], summary["strategy"])]
    partial = summary["rounds_to_target_count"] < summary["accuracy_count"]
    summary.loc[partial, ["rounds_to_target_mean", "rounds_to_target_std"]] = np.nan
    return summary


def accuracy_overview(summary: pd.DataFrame, cases: Sequence[PartitionCase]) -> str:
    """Return one table: final accuracy per strategy (rows) and partitioning (columns)."""
    names = [case.name for case in cases if case.name in set(summary["partitioning"])]
    wide = pd.DataFrame({"strategy": list(dict.fromkeys(summary["strategy"]))})
    for name in names:
        part = summary[summary["partitioning"] == name].set_index("strategy")
        wide[f"{name}_mean"] = wide["strategy"].map(part["accuracy_mean"])
        wide[f"{name}_std"] = wide["strategy"].map(part["accuracy_std"])
    return leaderboard_table(wide, "strategy", [Column(name, name) for name in names])


def write_outputs(matrix: Matrix, result: MatrixResult, out_dir: Path, command: str | None = None,
                  note: str = "") -> Path:
    """Write the CSV files, plots and ``results.md`` into ``out_dir``; return the report's path."""
    rounds = result.rounds
    if rounds.empty:
        raise ValueError(f"no run of the matrix finished ({len(result.failures)} failed), so there is nothing to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds.to_csv(out_dir / ROUNDS_FILE, index=False)
    runs = run_summaries(rounds, matrix.cases)
    runs.to_csv(out_dir / RUNS_FILE, index=False)
    summary = summarise_runs(runs)

    plots = []
    overall = rounds[rounds["test_set"] == OVERALL]
    for case in matrix.cases:
        part = overall[overall["partitioning"] == case.name]
        if len(part):
            path = plot_rounds(part, out_dir / f"accuracy-{case.name}.png",
                               title=f"{case.name}: global test accuracy per round (mean ± std over seeds)")
            plots.append((f"Accuracy per round, {case.name}", path.name))
    bars = summary.rename(columns={"partitioning": "test_set", "strategy": "model"})
    path = plot_bars(bars, out_dir / "aggregation-seconds.png", metric="aggregation_seconds",
                     title="server aggregation seconds per round (log scale)", log_scale=True)
    plots.append(("Server aggregation time per round", path.name))

    report = out_dir / REPORT_FILE
    report.write_text(render_report(matrix, summary, plots, command, note, result.failures), encoding="utf-8")
    return report


def render_report(matrix: Matrix, summary: pd.DataFrame, plots: Sequence[tuple[str, str]],
                  command: str | None = None, note: str = "", failures: Sequence[str] = ()) -> str:
    """Return the Markdown report: setup, overview, one leaderboard per partitioning, plots."""
    size = matrix.size
    command = command or "otfuse " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = ", ".join(f"{key} {value}" for key, value in size.model.items())
    lines = [
        "# Strategy benchmark",
        "",
        f"Command: `{command}`. Date: {stamp}. Machine: {machine_description()}.",
        *([note] if note else []),
        "",
        f"{len(matrix.strategies)} strategies x {len(matrix.cases)} partitionings x "
        f"{len(size.seeds)} seeds (seeds {', '.join(map(str, size.seeds))}): {matrix.num_runs} "
        f"runs of the Flower simulation, {size.rounds} rounds each. Every client has at most "
        f"{size.max_train_examples} rows, trains {size.epochs} epoch(s) per round with AdamW "
        f"(lr {size.lr:g}, batch {size.batch_size}); the server scores the global model on at most "
        f"{size.max_test_examples} test rows per data set. Model: {model}.",
        "",
        "| partitioning | data | clients | target accuracy |",
        "|---|---|---|---|",
    ]
    for case in matrix.cases:
        lines.append(f"| {case.name} | {case.description} | {case.num_clients} | {case.target_accuracy:.2f} |")
    if failures:
        lines += ["", f"{len(failures)} runs failed and are left out of every table:", ""]
        lines += [f"- {failure}" for failure in failures]
    lines += [
        "",
        "## Final global accuracy",
        "",
        "Accuracy of the global model after the last round on all test sets together, mean ± std "
        "over seeds; the best mean of each column is bold.",
        "",
        accuracy_overview(summary, matrix.cases),
        "",
        "## Leaderboards per partitioning",
        "",
        "Scores after the last round. Rounds to target: first round at or above the target "
        "accuracy, averaged only when every seed reached it (reached: seeds that did). MB per "
        "round: ArrayRecord bytes sent to and received from all clients in one round. Client "
        "train s: mean training time of one client in one round. Aggregation s: wall time of "
        "the strategy's aggregate_train (reply checks included). Aggregation / FedAvg: that "
        "time over FedAvg's in the same partitioning and seed.",
        "",
    ]
    for case in matrix.cases:
        part = summary[summary["partitioning"] == case.name]
        if not len(part):
            continue
        lines += [
            f"### {case.name}",
            "",
            leaderboard_table(part, "strategy", LEADERBOARD_COLUMNS, count_column="accuracy_count",
                              extra={"reached": "reached"}),
            "",
        ]
    lines += ["## Plots", ""]
    for title, name in plots:
        lines += [f"{title}:", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def machine_description() -> str:
    """Describe this machine for result headers: CPU count, processor and Python version."""
    import os

    return f"{os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}"
