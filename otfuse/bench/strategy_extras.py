"""In-process federated runs for robust fusion and client-side alignment, at reduced size.

The rounds call the ClientApp and the strategies directly, as the tests do, instead of
starting a SuperLink and Ray, so that the grid of strategies and attacks fits in minutes on
two CPU cores. Sizes are set at the top of this module and stated in the results files.

Run ``python -m otfuse.bench.strategy_extras robust OUT.md`` or ``... alignment OUT.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, Strategy
from flwr.supercore.task_identity import TaskIdentity

from otfuse.client.app import app as client_app
from otfuse.data_partitions import resolve_data_dir
from otfuse.runconfig import SEED, load_run_config
from otfuse.server.evaluation import GlobalEvaluator
from otfuse.strategies import build_strategy
from otfuse.task import run_model

logger = logging.getLogger(__name__)

#: Reduced sizes of both experiments (the full experiments train 3,000 rows per client).
BASE: dict[str, Any] = {
    "max-train-examples": 400,
    "max-test-examples": 300,
    "local-test-fraction": 0.0,
    "fraction-evaluate": 0.0,
    "min-evaluate-nodes": 0,
    "model.d-model": 32,
    "model.n-heads": 2,
    "model.n-layers": 1,
    "model.d-ff": 64,
    "model.vocab-size": 4096,
    "model.max-len": 32,
    "batch-size": 32,
}
ROUNDS = 3
ROBUST_CLIENTS = 4
ROBUST_ROUNDS = 2
ATTACKS = ("sign-flip", "label-flip")
ROBUST_STRATEGIES = ("fedavg", "otfusion-robust", "krum", "fedmedian", "fedtrimmedavg")


class _Grid:
    """The node list that strategies sample from; messages go to the ClientApp directly."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def run_rounds(
    run_config: Mapping[str, Any], strategy: Strategy, num_nodes: int, data_dir: Path, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Train ``rounds`` rounds in this process and return final accuracy and per-round notes."""
    # Flower builds Messages only inside a runtime that has set the task identity.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    config = load_run_config(run_config)
    task = run_model(config)
    arrays = ArrayRecord(task.exchanged_state(task.build(seed=config.get(SEED))))
    evaluator = GlobalEvaluator(config, data_dir)
    node_ids = list(range(1, num_nodes + 1))
    grid = _Grid(node_ids)
    started = time.perf_counter()
    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = [_client_reply(message, node_ids, run_config) for message in messages]
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
    scores = evaluator.evaluate(arrays)
    return {"scores": scores, "seconds": time.perf_counter() - started}


def _client_reply(message: Message, node_ids: list[int], run_config: Mapping[str, Any]) -> Message:
    from flwr.app import Context, RecordDict

    node_id = message.metadata.dst_node_id
    context = Context(
        run_id=1, node_id=node_id,
        node_config={"partition-id": node_ids.index(node_id), "num-partitions": len(node_ids)},
        state=RecordDict(), run_config=dict(run_config),
    )
    return client_app(message, context)


def _flower_strategy(name: str, num_nodes: int) -> Strategy:
    common = {"min_train_nodes": num_nodes, "min_available_nodes": num_nodes, "fraction_evaluate": 0.0,
              "min_evaluate_nodes": 0}
    if name == "krum":
        return Krum(num_malicious_nodes=1, **common)
    if name == "fedmedian":
        return FedMedian(**common)
    return FedTrimmedAvg(beta=0.25, **common)


def robust_experiment(data_dir: Path) -> list[dict[str, Any]]:
    """Four IID SST-2 clients, client 3 poisoned, six strategies."""
    rows = []
    for attack in ATTACKS:
        for name in ROBUST_STRATEGIES:
            run_config = {
                **BASE, "datasets": "sst2", "partitioning": "iid", "iid-dataset": "sst2",
                "min-train-nodes": ROBUST_CLIENTS, "min-available-nodes": ROBUST_CLIENTS,
                "attack.kind": attack, "attack.partition": ROBUST_CLIENTS - 1,
                # The norm check would reject the scaled model before any strategy sees it.
                "max-update-norm-ratio": 1e6,
            }
            if name in ("fedavg", "otfusion"):
                strategy = build_strategy({**run_config, "strategy": name})
            elif name == "otfusion-robust":
                strategy = build_strategy({**run_config, "strategy": "otfusion", "fusion.robust": "drop"})
            else:
                strategy = _flower_strategy(name, ROBUST_CLIENTS)
            result = run_rounds(run_config, strategy, ROBUST_CLIENTS, data_dir, rounds=ROBUST_ROUNDS)
            dropped = ""
            if name == "otfusion-robust":
                dropped = "; ".join(
                    f"r{server_round}: {record['flagged_nodes'] or '-'}"
                    for server_round, record in sorted(strategy.outliers.items())
                )
            rows.append({
                "attack": attack, "strategy": name,
                "accuracy": result["scores"]["overall"]["accuracy"],
                "dropped (node ids per round)": dropped, "seconds": result["seconds"],
            })
            logger.info("%s", rows[-1])
    return rows


def alignment_experiment(data_dir: Path) -> list[dict[str, Any]]:
    """One client per data set (SST-2, IMDB, Sentiment140): server- vs client-side alignment."""
    variants = {
        "fedavg": {"strategy": "fedavg"},
        "otfusion (server, weight cost)": {"strategy": "otfusion"},
        "otfusion-client (weight cost)": {"strategy": "otfusion-client", "client-alignment.cost": "weight"},
        "otfusion-client (activation cost)": {"strategy": "otfusion-client", "client-alignment.cost": "activation"},
    }
    rows = []
    for label, settings in variants.items():
        run_config = {**BASE, "datasets": "sst2,imdb,sentiment140", "partitioning": "per-dataset",
                      "min-train-nodes": 3, "min-available-nodes": 3, **settings}
        strategy = build_strategy(run_config)
        result = run_rounds(run_config, strategy, 3, data_dir)
        scores = result["scores"]
        rows.append({
            "strategy": label,
            **{f"{name} acc": values["accuracy"] for name, values in scores.items()},
            "seconds": result["seconds"],
        })
        logger.info("%s", rows[-1])
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [f"{value:.3f}" if isinstance(value, float) else str(value) for value in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("robust", "alignment"))
    parser.add_argument("output", type=Path)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    data_dir = resolve_data_dir(args.data_dir)
    rows = robust_experiment(data_dir) if args.experiment == "robust" else alignment_experiment(data_dir)
    args.output.write_text(markdown(rows))


if __name__ == "__main__":
    main()
