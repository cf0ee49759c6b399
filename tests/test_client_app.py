"""The ClientApp's train and evaluate handlers, called with real Flower messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from flower_helpers import (
    initial_arrays,
    node_context,
    set_task_identity,
    tiny_run_config,
    train_message,
)
from otfuse.client.app import app as client_app
from otfuse.client.app import training_seed
from otfuse.runconfig import RunConfigError

TRAIN_METRICS = {"train_loss", "train_accuracy", "num-examples", "train_seconds"}
EVALUATE_METRICS = {"eval_loss", "eval_accuracy", "eval_f1_weighted", "num-examples"}
# 200 rows per node, of which local-test-fraction 0.1 are held out.
TRAIN_ROWS, TEST_ROWS = 180, 20


@pytest.fixture(autouse=True)
def task_identity() -> None:
    set_task_identity()


@pytest.fixture
def run_config(data_dir):
    return tiny_run_config(data_dir)


def train_reply(run_config, partition_id=0, server_round=1, node_id=7) -> tuple[Message, Message]:
    arrays = initial_arrays(run_config)
    message = train_message(arrays, node_id=node_id, server_round=server_round)
    context = node_context(node_id, partition_id, 2, run_config)
    return message, client_app(message, context)


def test_train_reply_contents(run_config):
    message, reply = train_reply(run_config)

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert reply.metadata.dst_node_id == message.metadata.src_node_id
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == TRAIN_METRICS
    assert metrics["num-examples"] == TRAIN_ROWS
    assert 0.0 <= metrics["train_accuracy"] <= 1.0
    assert np.isfinite(metrics["train_loss"])


def test_train_reply_arrays_match_global_model(run_config):
    message, reply = train_reply(run_config)

    sent = message.content["arrays"].to_torch_state_dict()
    received = reply.content["arrays"].to_torch_state_dict()
    assert list(received) == list(sent)
    for name, tensor in sent.items():
        assert received[name].shape == tensor.shape, name
        assert received[name].dtype == torch.float32, name
    changed = [name for name in sent if not torch.equal(sent[name], received[name])]
    assert "head.weight" in changed


def test_train_deterministic_per_round(run_config):
    _, first = train_reply(run_config, partition_id=0, server_round=1)
    _, again = train_reply(run_config, partition_id=0, server_round=1)
    _, next_round = train_reply(run_config, partition_id=0, server_round=2)

    first_weights = first.content["arrays"].to_torch_state_dict()["head.weight"]
    assert torch.equal(first_weights, again.content["arrays"].to_torch_state_dict()["head.weight"])
    assert not torch.equal(first_weights, next_round.content["arrays"].to_torch_state_dict()["head.weight"])


def test_training_seed_differs_by_node_and_round():
    seeds = {training_seed(0, partition, server_round) for partition in range(3) for server_round in range(1, 4)}
    assert len(seeds) == 9
    assert training_seed(5, 1, 2) == training_seed(5, 1, 2)


def test_train_uses_only_own_partition(run_config):
    _, reply_0 = train_reply(run_config, partition_id=0)
    _, reply_1 = train_reply(run_config, partition_id=1)

    # Same initial model and round, different shards: the weights differ.
    head_0 = reply_0.content["arrays"].to_torch_state_dict()["head.weight"]
    head_1 = reply_1.content["arrays"].to_torch_state_dict()["head.weight"]
    assert not torch.equal(head_0, head_1)


def test_reply_carries_no_text(run_config):
    _, reply = train_reply(run_config)

    assert not reply.content.config_records
    for record in reply.content.metric_records.values():
        for value in record.values():
            assert isinstance(value, (int, float)), value


def test_evaluate_reports_local_scores(run_config):
    arrays = initial_arrays(run_config)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    message = Message(content, dst_node_id=7, message_type="evaluate")

    reply = client_app(message, node_context(7, 0, 2, run_config))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.keys()) == {"metrics"}
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == EVALUATE_METRICS
    assert metrics["num-examples"] == TEST_ROWS
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert 0.0 <= metrics["eval_f1_weighted"] <= 1.0


# Called directly, a handler raises. Flower's runtime turns the exception into an error reply.
def test_train_without_partition_config_raises(run_config):
    message = train_message(initial_arrays(run_config), node_id=7)
    context = node_context(7, 0, 2, run_config)
    context.node_config = {}

    with pytest.raises(ValueError, match="partition-id"):
        client_app(message, context)


def test_train_with_other_model_shape_raises(run_config):
    other = tiny_run_config(run_config["data-dir"], **{"model.d-model": 32})
    message = train_message(initial_arrays(other), node_id=7)

    with pytest.raises(RuntimeError, match="size mismatch"):
        client_app(message, node_context(7, 0, 2, run_config))


def test_train_with_invalid_run_config_raises(run_config):
    message = train_message(initial_arrays(run_config), node_id=7)
    run_config["batch-size"] = "64"

    with pytest.raises(RunConfigError, match="batch-size"):
        client_app(message, node_context(7, 0, 2, run_config))


def test_array_record_round_trip(run_config):
    arrays = initial_arrays(run_config)
    copy = ArrayRecord(arrays.to_torch_state_dict())
    for name, tensor in arrays.to_torch_state_dict().items():
        assert torch.equal(copy.to_torch_state_dict()[name], tensor)
