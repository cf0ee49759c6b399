"""Federated mode of an experiment: the same clients through the Flower simulation, per strategy.

Each strategy and seed is one ``otfuse run`` (a local SuperLink and a Ray simulation), so the
strategies see identical clients, data and initial model.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from otfuse.bench.config import ExperimentConfig
from otfuse.bench.report import markdown_table, plot_rounds, summarise
from otfuse.models import ModelConfig, parameter_shapes
from otfuse.runconfig import BASELINE_STRATEGIES

logger = logging.getLogger(__name__)

# Federated strategy names of the experiment files and their run-config settings.
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "otfusion-hard": {"strategy": "otfusion", "fusion.alignment": "hard"},
    "otfusion-soft": {"strategy": "otfusion", "fusion.alignment": "soft"},
    "otfusion-none": {"strategy": "otfusion", "fusion.alignment": "none"},
    "otfusion-client": {"strategy": "otfusion-client"},
    **{name: {"strategy": name} for name in BASELINE_STRATEGIES},
}
FLOWER_METRICS = ("accuracy", "f1_weighted", "loss")
# Partition options of the experiment files and the run-config keys they set.
PARTITION_OPTION_KEYS = {"alpha": "dirichlet-alpha", "size_skew": "size-skew"}


def run_config_values(config: ExperimentConfig, strategy: str, seed: int) -> dict[str, Any]:
    """Translate the experiment's settings into the Flower app's run-config keys."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown federated strategy {strategy!r}; choose from {sorted(STRATEGIES)}")
    values: dict[str, Any] = {
        "seed": seed,
        "num-server-rounds": int(config.federated.get("rounds", 3)),
        "datasets": ",".join(config.datasets),
        "partitioning": "iid" if config.parent_data == "shared" else config.partitioning,
        "iid-dataset": config.datasets[0],
        "max-train-examples": config.max_train_examples or 0,
        "max-test-examples": config.max_test_examples or 0,
        "local-epochs": config.epochs,
        "batch-size": config.batch_size,
        "learning-rate": config.lr,
        # The parents of one-shot mode train on all their rows, so clients hold none out here.
        "local-test-fraction": 0.0,
        "fraction-evaluate": 0.0,
        "min-train-nodes": config.num_parents,
        "min-evaluate-nodes": 0,
        "min-available-nodes": config.num_parents,
    }
    for key, value in config.model.items():
        values[f"model.{key.replace('_', '-')}"] = value
    for key, value in config.partition_options.items():
        if key not in PARTITION_OPTION_KEYS:
            raise ValueError(
                f"experiment {config.name!r}: partition option {key!r} has no run-config key in "
                f"federated mode; use one of {sorted(PARTITION_OPTION_KEYS)}"
            )
        values[PARTITION_OPTION_KEYS[key]] = value
    values.update(config.federated.get("run_config", {}))
    values.update(STRATEGIES[strategy])
    return values


def run_config_line(values: Mapping[str, Any]) -> str:
    """Format settings as a ``--run-config`` value (TOML literals)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def run_one(config: ExperimentConfig, strategy: str, seed: int, out_dir: Path, data_dir=None,
            quiet: bool = True, ray_address: str | None = None) -> list[dict[str, Any]]:
    """Run one strategy and seed through ``otfuse run``; return its metrics records.

    A finished run in the output folder is read instead of run again. A folder with a
    crashed or interrupted run, or a run with other settings, is deleted and run again.
    ``ray_address`` attaches the simulation to a running Ray cluster (see ``otfuse run
    --ray-address``).
    """
    from otfuse.cli.run_command import execute, plan_run

    output_dir, values, finished = _prepare_run(config, strategy, seed, out_dir)
    if finished is not None:
        return finished
    args = argparse.Namespace(
        app=None, strategy=None, rounds=None, data_dir=data_dir, num_clients=config.num_parents,
        output_dir=str(output_dir), run_config=[run_config_line(values)],
        client_cpus=1, quiet=quiet, ray_address=ray_address,
    )
    plan = plan_run(args)
    return execute(plan, Console(quiet=quiet))


def run_one_process(config: ExperimentConfig, strategy: str, seed: int, out_dir: Path, data_dir=None,
                    ray_address: str | None = None,
                    on_start: Callable[[subprocess.Popen], None] | None = None) -> list[dict[str, Any]]:
    """Run one strategy and seed like :func:`run_one`, but as an ``otfuse run`` child process.

    Several of these can run at once from threads: each child has its own SuperLink, ports
    and signal handler, so a SIGTERM sent to the child stops its SuperLink and simulation.
    ``on_start`` receives the child right after it started, for the caller to stop it.
    """
    from otfuse.cli.errors import CommandError
    from otfuse.server.outputs import METRICS_FILE, read_metrics

    output_dir, values, finished = _prepare_run(config, strategy, seed, out_dir)
    if finished is not None:
        return finished
    command = [
        sys.executable, "-m", "otfuse.cli.main", "run", "--quiet",
        "--num-clients", str(config.num_parents), "--client-cpus", "1",
        "--output-dir", str(output_dir), "--run-config", run_config_line(values),
    ]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    if ray_address is not None:
        command += ["--ray-address", ray_address]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    if on_start is not None:
        on_start(process)
    output, _ = process.communicate()
    if process.returncode != 0:
        lines = output.strip().splitlines()
        raise CommandError(
            f"otfuse run for {strategy} seed {seed} exited with code {process.returncode}: "
            f"{lines[-1] if lines else 'no output'}",
            exit_code=1 if process.returncode == 1 else process.returncode,
        )
    if not finished_run(output_dir, values):
        raise CommandError(f"otfuse run for {strategy} seed {seed} exited with code 0 but left no "
                           f"complete run in {output_dir}")
    return read_metrics(output_dir / METRICS_FILE)


def _prepare_run(config: ExperimentConfig, strategy: str, seed: int,
                 out_dir: Path) -> tuple[Path, dict[str, Any], list[dict[str, Any]] | None]:
    """Return the run's folder, its run-config values, and its records if it already finished.

    A folder with an unfinished run, or a run with other settings, is deleted.
    """
    from otfuse.server.outputs import METRICS_FILE, read_metrics

    output_dir = out_dir / "federated" / f"{strategy}-seed{seed}"
    values = run_config_values(config, strategy, seed)
    if finished_run(output_dir, values):
        logger.info("%s seed %d already ran; reading %s", strategy, seed, output_dir / METRICS_FILE)
        return output_dir, values, read_metrics(output_dir / METRICS_FILE)
    if output_dir.exists():
        logger.warning("%s seed %d: %s contains an unfinished run or other settings; running it again",
                       strategy, seed, output_dir)
        shutil.rmtree(output_dir)
    return output_dir, values, None


def finished_run(output_dir: Path, values: Mapping[str, Any]) -> bool:
    """Return whether ``output_dir`` contains a complete run with the run-config ``values``.

    Complete means that ``metrics.jsonl`` has one record for each round from 0 to
    ``num-server-rounds`` and the final model exists; the ServerApp writes the model last.
    """
    from otfuse.server.outputs import METRICS_FILE, MODEL_FILE, RUN_CONFIG_FILE, read_metrics

    metrics_path, config_path = output_dir / METRICS_FILE, output_dir / RUN_CONFIG_FILE
    if not (metrics_path.is_file() and config_path.is_file() and (output_dir / MODEL_FILE).is_file()):
        return False
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        rounds = [record["round"] for record in read_metrics(metrics_path)]
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("cannot read the run in %s (%s); it counts as unfinished", output_dir, error)
        return False
    if any(saved.get(key) != value for key, value in values.items()):
        return False
    return rounds == list(range(int(saved["num-server-rounds"]) + 1))


def records_to_rows(records: list[dict[str, Any]], strategy: str, seed: int, bytes_per_round: float,
                    local_epochs: int) -> list[dict[str, Any]]:
    """Flatten metrics records into one row per round and test set.

    ``mb_sent_per_round`` is the measured array bytes of the round when the record has
    them, else ``bytes_per_round``. ``round_seconds`` is the wall time since the previous
    record, and ``client_train_seconds`` the mean training time of the round's clients.
    """
    rows = []
    previous_elapsed = None
    for record in records:
        first = record["round"] == 0
        measured_bytes = record.get("bytes_sent")
        if measured_bytes is not None:
            mb_sent = (measured_bytes + record.get("bytes_received", 0)) / 1e6
        else:
            mb_sent = 0.0 if first else bytes_per_round / 1e6
        elapsed = record.get("elapsed_seconds")
        round_seconds = None if elapsed is None or previous_elapsed is None else elapsed - previous_elapsed
        previous_elapsed = elapsed
        train_seconds = [client.get("train_seconds") for client in record.get("client_train", [])]
        train_seconds = [value for value in train_seconds if value is not None]
        costs = {
            "fusion_seconds": record.get("fusion_seconds"),
            "aggregation_seconds": record.get("aggregation_seconds"),
            "mb_sent_per_round": mb_sent,
            "client_train_seconds": sum(train_seconds) / len(train_seconds) if train_seconds else None,
            "round_seconds": None if first else round_seconds,
            "client_epochs_per_round": 0 if first else local_epochs,
        }
        scores = {**record.get("datasets", {}), "overall": record.get("overall", {})}
        for test_set, values in scores.items():
            rows.append({
                "seed": seed, "strategy": strategy, "round": record["round"], "test_set": test_set,
                **{metric: values.get(metric) for metric in (*FLOWER_METRICS, "ece")},
                **costs,
            })
    return rows


def run_federated_mode(config: ExperimentConfig, out_dir: Path, data_dir=None, show_progress: bool = True) -> str:
    """Run every configured strategy and seed; write ``federated.csv`` and plots; return a Markdown section."""
    from rich.progress import Progress

    strategies = list(config.federated.get("strategies", ["fedavg", "otfusion-hard"]))
    architecture = ModelConfig.from_dict({"n_classes": 2, **dict(config.model)})
    model_bytes = 4 * sum(_count(shape) for shape in parameter_shapes(architecture).values())
    # Every round the server sends the global model to each client and each client replies with its model.
    bytes_per_round = 2 * config.num_parents * model_bytes
    # The federated block's run_config may set other local epochs than the one-shot parents train.
    local_epochs = int(config.federated.get("run_config", {}).get("local-epochs", config.epochs))
    rows = []
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task(f"{config.name} federated", total=len(strategies) * len(config.seeds))
        for seed in config.seeds:
            for strategy in strategies:
                records = run_one(config, strategy, seed, out_dir, data_dir)
                rows.extend(records_to_rows(records, strategy, seed, bytes_per_round, local_epochs))
                progress.advance(task)
    frame = pd.DataFrame(rows)
    frame.to_csv(out_dir / "federated.csv", index=False)
    overall = frame[frame["test_set"] == "overall"]
    plot_rounds(overall, out_dir / "federated_rounds.png", title=f"{config.name}: global test accuracy per round")
    final_round = frame[frame["round"] == frame["round"].max()].rename(columns={"strategy": "model"})
    summary = summarise(final_round)
    rounds = int(frame["round"].max())
    lines = [
        "## Federated simulation",
        "",
        f"{rounds} rounds, {config.num_parents} clients, {local_epochs} local epoch(s) per round, "
        f"{bytes_per_round / 1e6:.1f} MB sent per round (model down and up, every client). "
        "Every client starts each round from the same global model, so parents from different "
        "random initialisations exist only in one-shot mode. Scores of the global model after "
        "the last round:",
        "",
    ]
    for test_set in dict.fromkeys(summary["test_set"]):
        lines += [f"### Test set: {test_set}", "", markdown_table(summary, test_set), ""]
    lines += ["![rounds](federated_rounds.png)", ""]
    return "\n".join(lines)


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
