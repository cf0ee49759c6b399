"""One node's local update: train the received global model, then prepare the reply tensors.

Both ways a train instruction can arrive use it: the Message API of the default strategies
(:mod:`otfuse.client.app`) and the legacy format of Flower's SecAgg+ workflow
(:mod:`otfuse.client.secagg`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO

import numpy as np
import torch
from flwr.app import Context
from flwr.common import log

from otfuse import records
from otfuse.client.alignment import reply_state
from otfuse.client.attack import is_attacker, poisoned_labels
from otfuse.client.partition import load_partition
from otfuse.client.widths import node_model, received_state
from otfuse.runconfig import (
    ATTACK_KIND,
    ATTACK_PARTITION,
    BATCH_SIZE,
    LEARNING_RATE,
    LOCAL_EPOCHS,
    SEED,
    WEIGHT_DECAY,
    RunConfig,
)
from otfuse.training import train_model


@dataclass
class LocalUpdate:
    """The tensors a node sends (aligned for ``otfusion-client``) and its training metrics."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float | int]

    @property
    def num_examples(self) -> int:
        return int(self.metrics[records.NUM_EXAMPLES])


def local_update(
    config: RunConfig,
    context: Context,
    received: Mapping[str, torch.Tensor],
    server_round: int,
    proximal_mu: float = 0.0,
) -> LocalUpdate:
    """Train ``received`` on this node's train part and return the reply tensors and metrics."""
    partition_id, num_partitions = node_partition(context)
    data = load_partition(config, partition_id, num_partitions)
    task = node_model(config, partition_id)
    # A node narrower than the global model trains on the received model at its own width.
    received = received_state(config, task, received)
    model = task.build()
    task.load_exchanged(model, received)
    train_labels = data.train_labels
    if is_attacker(config.get(ATTACK_KIND), config.get(ATTACK_PARTITION), partition_id):
        # Benchmarks only: this partition plays the poisoned client of the attack.* settings.
        train_labels = poisoned_labels(train_labels, config.get(ATTACK_KIND), config.model_config().n_classes)

    result = train_model(
        model,
        data.train_ids,
        train_labels,
        epochs=config.get(LOCAL_EPOCHS),
        batch_size=config.get(BATCH_SIZE),
        lr=config.get(LEARNING_RATE),
        weight_decay=config.get(WEIGHT_DECAY),
        seed=training_seed(config.get(SEED), partition_id, server_round),
        proximal_mu=proximal_mu,
    )
    log(
        INFO,
        "partition %d, round %d: trained on %d examples in %.1f s, loss %.4f",
        partition_id, server_round, result["num_examples"], result["seconds"], result["train_loss"],
    )
    state, reply_metrics = reply_state(
        config, task, task.exchanged_state(model), received, data.train_ids, partition_id
    )
    metrics = {
        records.TRAIN_LOSS: float(result["train_loss"]),
        records.TRAIN_ACCURACY: float(result["train_accuracy"]),
        records.NUM_EXAMPLES: int(result["num_examples"]),
        records.TRAIN_SECONDS: float(result["seconds"]),
        **reply_metrics,
    }
    return LocalUpdate(state, metrics)


def node_partition(context: Context) -> tuple[int, int]:
    """Return this node's partition id and the number of partitions from its node config."""
    keys = (records.PARTITION_ID, records.NUM_PARTITIONS)
    missing = [key for key in keys if key not in context.node_config]
    if missing:
        raise ValueError(
            f"node config has no {missing[0]!r}; the simulation sets it, and a SuperNode needs "
            "--node-config \"partition-id=0 num-partitions=3\""
        )
    partition_id = int(context.node_config[records.PARTITION_ID])
    num_partitions = int(context.node_config[records.NUM_PARTITIONS])
    return partition_id, num_partitions


def training_seed(run_seed: int, partition_id: int, server_round: int) -> int:
    """Derive a seed for one node and round, distinct across nodes and rounds of a run."""
    sequence = np.random.SeedSequence([run_seed, partition_id, server_round])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])
