"""The ClientApp: trains and evaluates the global model on this node's partition only.

Handlers stay thin: the data comes from :mod:`otfuse.client.partition`, the training and
the reply tensors from :mod:`otfuse.client.local_update`, and the SecAgg+ path lives in
:mod:`otfuse.client.secagg`. Replies carry weights and aggregate metrics, never text.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from otfuse import records
from otfuse.client.local_update import local_update, node_partition, training_seed
from otfuse.client.partition import load_partition
from otfuse.client.secagg import carries_legacy_fitins, secagg_when_requested, train_legacy
from otfuse.client.widths import node_model, received_state
from otfuse.runconfig import BATCH_SIZE, RunConfig, load_run_config
from otfuse.task import RunModel
from otfuse.training import evaluate_model

__all__ = ["app", "node_partition", "proximal_mu", "training_seed"]

app = ClientApp()


@app.train(mods=[secagg_when_requested])
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's train part and reply with the weights.

    An instruction of Flower's SecAgg+ workflow (legacy ``fitins`` records) goes to
    :func:`otfuse.client.secagg.train_legacy`, which replies in the legacy format.
    """
    if carries_legacy_fitins(msg):
        return train_legacy(msg, context)
    config = load_run_config(context.run_config)
    server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
    update = local_update(
        config, context, msg.content[records.ARRAYS].to_torch_state_dict(), server_round, proximal_mu(msg)
    )
    content = RecordDict(
        {records.ARRAYS: ArrayRecord(update.state), records.METRICS: MetricRecord(update.metrics)}
    )
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


def _received_model(msg: Message, config: RunConfig, task: RunModel) -> torch.nn.Module:
    model = task.build()
    received = msg.content[records.ARRAYS].to_torch_state_dict()
    task.load_exchanged(model, received_state(config, task, received))
    return model
