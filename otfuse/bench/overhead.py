"""Wall time of the Flower simulation per round, OTFusion against FedAvg on identical clients.

Both strategies run the same clients, data, seed and initial model through ``otfuse run``.
Each round's wall time is split into client training, server aggregation, server evaluation
of the global model, and the rest, which is Flower's and Ray's own work: messages, actor
scheduling, and the ClientApp's model construction and data cache lookups.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from otfuse.bench.federated import run_one
from otfuse.bench.strategies import CASES, DEFAULT_SIZE, experiment_config

STRATEGIES = ("fedavg", "otfusion-hard")


@dataclass(frozen=True)
class RunTimes:
    """Seconds of one run: the whole command, its phases, and the mean of the later rounds.

    ``startup`` runs from the command's start to the record of round 0 (SuperLink, ``flwr
    run``, app install, ServerApp start, test data, first evaluation). ``first_round``
    includes starting Ray and the ClientApp actors. The ``round_*`` values are means over
    rounds 2 to N, when the actors are warm. ``round_training`` estimates the training part
    of a round as the clients' summed training time over the actors that run at once.
    """

    strategy: str
    command: float
    startup: float
    first_round: float
    teardown: float
    round_wall: float
    round_training: float
    round_aggregation: float
    round_evaluation: float

    @property
    def round_overhead(self) -> float:
        """Return the rest of a round: Flower and Ray's messaging, scheduling and client setup."""
        return self.round_wall - self.round_training - self.round_aggregation - self.round_evaluation


def measure(out_dir: Path, data_dir=None, *, rounds: int = 6, seed: int = 0, num_clients: int = 4,
            client_cpus: int = 1, ray_address: str | None = None) -> list[RunTimes]:
    """Run FedAvg and OTFusion (hard alignment) once each from scratch and time them."""
    case = next(case for case in CASES if case.name == "iid")
    size = replace(DEFAULT_SIZE, seeds=(seed,), rounds=rounds)
    config = experiment_config(case, size, STRATEGIES).with_overrides(num_parents=num_clients)
    parallel = max(1, min(num_clients, (os.cpu_count() or 1) // client_cpus))
    results = []
    for strategy in STRATEGIES:
        run_dir = out_dir / "federated" / f"{strategy}-seed{seed}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        started_at = datetime.now().astimezone()
        started = time.perf_counter()
        records = run_one(config, strategy, seed, out_dir, data_dir, ray_address=ray_address)
        command = time.perf_counter() - started
        results.append(run_times(strategy, records, started_at, command, parallel))
    return results


def run_times(strategy: str, records: list[dict[str, Any]], started_at: datetime, command: float,
              parallel: int) -> RunTimes:
    """Split a run's records into the phases of :class:`RunTimes`."""
    stamps = [datetime.fromisoformat(record["time"]) for record in records]
    elapsed = [record["elapsed_seconds"] for record in records]
    walls = np.diff(elapsed)
    later = records[2:]
    if not later:
        raise ValueError(f"{strategy}: the overhead needs at least 2 rounds, got {len(records) - 1}")
    training = [sum(client["train_seconds"] for client in record["client_train"]) / parallel for record in later]
    startup = (stamps[0] - started_at).total_seconds()
    return RunTimes(
        strategy=strategy,
        command=command,
        startup=startup,
        first_round=float(walls[0]),
        teardown=command - startup - float(elapsed[-1] - elapsed[0]),
        round_wall=float(np.mean(walls[1:])),
        round_training=float(np.mean(training)),
        round_aggregation=float(np.mean([record["aggregation_seconds"] for record in later])),
        round_evaluation=float(np.mean([record["evaluation_seconds"] for record in later])),
    )


def markdown(results: list[RunTimes]) -> str:
    """Return two Markdown tables: one steady round, and the phases of the whole run."""
    lines = [
        "| strategy | round wall s | client training s | aggregation s | server evaluation s | Flower + Ray s |",
        "|---|---|---|---|---|---|",
    ]
    for times in results:
        lines.append(
            f"| {times.strategy} | {times.round_wall:.2f} | {times.round_training:.2f} | "
            f"{times.round_aggregation:.3f} | {times.round_evaluation:.2f} | {times.round_overhead:.2f} |"
        )
    lines += [
        "",
        "| strategy | command s | start to round 0 s | round 1 s | teardown s |",
        "|---|---|---|---|---|",
    ]
    for times in results:
        lines.append(
            f"| {times.strategy} | {times.command:.1f} | {times.startup:.1f} | {times.first_round:.1f} | "
            f"{times.teardown:.1f} |"
        )
    return "\n".join(lines)
