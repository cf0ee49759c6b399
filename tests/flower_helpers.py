"""Helpers for calling the ClientApp and the strategies directly, without Ray or a SuperLink."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from otfuse.client.app import app as client_app
from otfuse.models import build_model
from otfuse.runconfig import load_run_config

RUN_ID = 1


def tiny_run_config(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Return a run config for a model of a few thousand parameters on small SST-2 shards."""
    values: dict[str, Any] = {
        "data-dir": str(data_dir),
        "datasets": "sst2",
        "partitioning": "iid",
        "iid-dataset": "sst2",
        "max-train-examples": 200,
        "max-test-examples": 100,
        "model.vocab-size": 512,
        "model.max-len": 16,
        "model.d-model": 16,
        "model.n-heads": 2,
        "model.n-layers": 1,
        "model.d-ff": 32,
    }
    values.update(overrides)
    return values


def set_task_identity() -> None:
    """Give this process the task identity that Flower's runtime sets before a Message is built."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 0


def initial_arrays(run_config: dict[str, Any], seed: int = 0) -> ArrayRecord:
    config = load_run_config(run_config).model_config()
    return ArrayRecord(build_model(config, seed=seed).state_dict())


class FixedNodesGrid(Grid):
    """A Grid that only lists a fixed set of connected nodes.

    Strategies need a Grid to sample nodes in ``configure_train``; the messages they return
    are then handed to the ClientApp directly, so the transport methods are never used.
    """

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = list(node_ids)

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError


def node_context(node_id: int, partition_id: int, num_partitions: int, run_config: dict[str, Any]) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=run_config,
    )


def train_message(arrays: ArrayRecord, node_id: int, server_round: int = 1) -> Message:
    """Build the instruction that FedAvg sends for one node's training."""
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=node_id, message_type="train")


def run_clients(messages: Iterable[Message], run_config: dict[str, Any]) -> list[Message]:
    """Pass each instruction to the ClientApp of partition i (in message order) and collect replies."""
    messages = list(messages)
    replies = []
    for partition_id, message in enumerate(messages):
        context = node_context(message.metadata.dst_node_id, partition_id, len(messages), run_config)
        replies.append(client_app(message, context))
    return replies
