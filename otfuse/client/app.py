"""The ClientApp: trains and evaluates the global model on this node's partition only.

Handlers stay thin: the data comes from :mod:`otfuse.client.partition` and the training
from :mod:`otfuse.training`. Replies carry weights and aggregate metrics, never text.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
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
    load_run_config,
)
from otfuse.task import RunModel
from otfuse.training import evaluate_model, train_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's train part and reply with the weights."""
    config = load_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context)
    server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
    data = load_partition(config, partition_id, num_partitions)
    task = node_model(config, partition_id)
    model = _received_model(msg, config, task)
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
        proximal_mu=proximal_mu(msg),
    )
    log(
        INFO,
        "partition %d, round %d: trained on %d examples in %.1f s, loss %.4f",
        partition_id, server_round, result["num_examples"], result["seconds"], result["train_loss"],
    )
    state, reply_metrics = reply_state(
        config, task, task.exchanged_state(model), msg.content[records.ARRAYS].to_torch_state_dict(),
        data.train_ids, partition_id,
    )
    metrics = MetricRecord(
        {
            records.TRAIN_LOSS: float(result["train_loss"]),
            records.TRAIN_ACCURACY: float(result["train_accuracy"]),
            records.NUM_EXAMPLES: int(result["num_examples"]),
            records.TRAIN_SECONDS: float(result["seconds"]),
            **reply_metrics,
        }
    )
    content = RecordDict({records.ARRAYS: ArrayRecord(state), records.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global model on this node's local held-out part."""
    config = load_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context)
    data = load_partition(config, partition_id, num_partitions)
    if len(data.test_labels) == 0:
        raise ValueError(
            f"partition {partition_id} has no local test examples; raise local-test-fraction "
            "above 0 or set fraction-evaluate=0"
        )
    model = _received_model(msg, config, node_model(config, partition_id))
    scores = evaluate_model(model, data.test_ids, data.test_labels, batch_size=config.get(BATCH_SIZE))
    metrics = MetricRecord(
        {
            records.EVAL_LOSS: float(scores["loss"]),
            records.EVAL_ACCURACY: float(scores["accuracy"]),
            records.EVAL_F1_WEIGHTED: float(scores["f1_weighted"]),
            records.NUM_EXAMPLES: int(scores["num_examples"]),
        }
    )
    return Message(RecordDict({records.METRICS: metrics}), reply_to=msg)


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


def proximal_mu(msg: Message) -> float:
    """Return the FedProx weight ``proximal-mu`` of the train config, 0 when absent.

    Flower's FedProx puts it in the config of every train message. The proximal term pulls
    the weights toward the received global model, which is the model's state when training
    starts.
    """
    value = msg.content[records.CONFIG].get(records.PROXIMAL_MU, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(
            f"train config {records.PROXIMAL_MU!r} must be a number >= 0, got {value!r}; check "
            "the server's fedprox.mu setting"
        )
    return float(value)


def training_seed(run_seed: int, partition_id: int, server_round: int) -> int:
    """Derive a seed for one node and round, distinct across nodes and rounds of a run."""
    sequence = np.random.SeedSequence([run_seed, partition_id, server_round])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def _received_model(msg: Message, config: RunConfig, task: RunModel) -> torch.nn.Module:
    model = task.build()
    received = msg.content[records.ARRAYS].to_torch_state_dict()
    task.load_exchanged(model, received_state(config, task, received))
    return model
