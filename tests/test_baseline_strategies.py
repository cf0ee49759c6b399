"""Flower's own strategies from the run config, FedProx on the client, and per-round measurements."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi

from flower_helpers import FixedNodesGrid, initial_arrays, run_clients, set_task_identity, tiny_run_config
from otfuse.runconfig import BASELINE_STRATEGIES, RunConfigError
from otfuse.server.outputs import MetricsWriter, read_metrics
from otfuse.server.rounds import RoundReporter
from otfuse.strategies import ClientMetricsLog, build_strategy
from otfuse.strategies.measured import MeasuredStrategy, RoundMeasurement, measured

NODE_IDS = (201, 202)
FLOWER_CLASSES = {
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    set_task_identity()


@pytest.fixture(scope="module")
def run_config(data_dir):
    return tiny_run_config(data_dir)


@pytest.fixture(scope="module")
def global_arrays(run_config):
    set_task_identity()
    return initial_arrays(run_config)


def train_round(strategy, run_config, global_arrays, server_round=1):
    messages = list(strategy.configure_train(server_round, global_arrays, ConfigRecord(), FixedNodesGrid(NODE_IDS)))
    messages.sort(key=lambda message: message.metadata.dst_node_id)
    return messages, run_clients(messages, run_config)


def distance(arrays, reference) -> float:
    state, reference_state = arrays.to_torch_state_dict(), reference.to_torch_state_dict()
    return float(sum((state[name] - tensor).pow(2).sum() for name, tensor in reference_state.items()))


@pytest.mark.parametrize("name", BASELINE_STRATEGIES)
def test_baseline_is_measured_flower_class(run_config, name):
    strategy = build_strategy({**run_config, "strategy": name, "min-train-nodes": 2})

    assert isinstance(strategy, FLOWER_CLASSES[name])
    assert isinstance(strategy, MeasuredStrategy)
    assert type(strategy).__name__ == FLOWER_CLASSES[name].__name__
    assert strategy.min_train_nodes == 2


def test_baseline_settings_come_from_run_config(run_config):
    fedprox = build_strategy({**run_config, "strategy": "fedprox", "fedprox.mu": 0.5})
    fedavgm = build_strategy(
        {**run_config, "strategy": "fedavgm", "fedavgm.server-lr": 0.7, "fedavgm.server-momentum": 0.3}
    )
    fedyogi = build_strategy(
        {**run_config, "strategy": "fedyogi", "fedopt.eta": 0.02, "fedopt.beta-1": 0.5,
         "fedopt.beta-2": 0.6, "fedopt.tau": 0.1}
    )
    trimmed = build_strategy({**run_config, "strategy": "fedtrimmedavg", "fedtrimmedavg.beta": 0.3})

    assert fedprox.proximal_mu == 0.5
    assert (fedavgm.server_learning_rate, fedavgm.server_momentum) == (0.7, 0.3)
    assert (fedyogi.eta, fedyogi.beta_1, fedyogi.beta_2, fedyogi.tau) == (0.02, 0.5, 0.6, 0.1)
    assert trimmed.beta == 0.3


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        pytest.param({"strategy": "fedadam", "fedopt.beta-1": 1.0}, ["'fedopt.beta-1'", "below 1"], id="beta-1-one"),
        pytest.param({"strategy": "fedyogi", "fedopt.beta-2": 1.0}, ["'fedopt.beta-2'", "below 1"], id="beta-2-one"),
        pytest.param({"strategy": "fedtrimmedavg", "fedtrimmedavg.beta": 0.5}, ["'fedtrimmedavg.beta'", "below 0.5"], id="trim-half"),
        pytest.param({"strategy": "fedprox", "fedprox.mu": -1.0}, ["'fedprox.mu'", ">= 0"], id="negative-mu"),
    ],
)
def test_invalid_baseline_setting_rejected(run_config, settings, words):
    with pytest.raises(RunConfigError) as raised:
        build_strategy({**run_config, **settings})

    for word in words:
        assert word in str(raised.value)


def test_fedprox_sends_mu_to_clients(run_config, global_arrays):
    strategy = build_strategy({**run_config, "strategy": "fedprox", "fedprox.mu": 0.25})

    messages, _ = train_round(strategy, run_config, global_arrays)

    for message in messages:
        assert message.content["config"]["proximal-mu"] == 0.25


def test_fedprox_mu_limits_client_drift(run_config, global_arrays):
    drifts = []
    for mu in (0.0, 1000.0):
        strategy = build_strategy({**run_config, "strategy": "fedprox", "fedprox.mu": mu})
        _, replies = train_round(strategy, run_config, global_arrays)
        drifts.append(np.mean([distance(reply.content["arrays"], global_arrays) for reply in replies]))

    assert drifts[1] < 0.5 * drifts[0]


def test_client_rejects_negative_mu(run_config, global_arrays):
    strategy = build_strategy({**run_config, "strategy": "fedprox"})
    strategy.proximal_mu = -1.0

    with pytest.raises(ValueError, match="'proximal-mu' must be a number >= 0"):
        train_round(strategy, run_config, global_arrays)


@pytest.mark.parametrize("name", ["fedavg", "otfusion", *BASELINE_STRATEGIES])
def test_round_measurement_recorded(run_config, global_arrays, name):
    strategy = build_strategy({**run_config, "strategy": name})

    messages, replies = train_round(strategy, run_config, global_arrays)
    # Some of Flower's aggregations empty the replies' arrays, so count them first.
    received = sum(reply.content["arrays"].count_bytes() for reply in replies)
    arrays, _ = strategy.aggregate_train(1, replies)

    measurement = strategy.measurements[1]
    assert arrays is not None
    assert received > 0
    assert measurement.bytes_sent == len(NODE_IDS) * global_arrays.count_bytes()
    assert measurement.bytes_received == received
    assert measurement.num_train_replies == len(NODE_IDS)
    assert measurement.aggregation_seconds > 0


def test_measured_aggregation_equals_flower(run_config, global_arrays):
    plain = FedMedian(min_train_nodes=2, min_available_nodes=2)
    wrapped = measured(FedMedian)(min_train_nodes=2, min_available_nodes=2)
    _, replies = train_round(wrapped, run_config, global_arrays)
    list(plain.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid(NODE_IDS)))

    # Flower's median empties the replies' arrays, so each strategy gets its own copies.
    expected, _ = plain.aggregate_train(1, copy.deepcopy(replies))
    actual, _ = wrapped.aggregate_train(1, replies)

    for name, tensor in expected.to_torch_state_dict().items():
        assert torch.equal(actual.to_torch_state_dict()[name], tensor), name


def test_measured_class_is_cached():
    assert measured(FedMedian) is measured(FedMedian)
    assert measured(measured(FedMedian)) is measured(FedMedian)


def test_aggregation_error_still_timed(run_config, global_arrays):
    strategy = build_strategy({**run_config, "strategy": "fedmedian"})
    _, replies = train_round(strategy, run_config, global_arrays)
    instruction = Message(RecordDict(), dst_node_id=NODE_IDS[0], message_type="train")
    content = RecordDict({"arrays": replies[0].content["arrays"], "metrics": MetricRecord({"train_loss": 1.0})})
    without_weight = Message(content, reply_to=instruction)

    with pytest.raises(InconsistentMessageReplies):
        strategy.aggregate_train(1, [without_weight, replies[1]])

    assert strategy.measurements[1].aggregation_seconds is not None


def test_measurement_as_dict_keys():
    assert set(RoundMeasurement().as_dict()) == {
        "aggregation_seconds", "bytes_sent", "bytes_received", "num_train_replies",
    }


@pytest.mark.parametrize("name", ["fedprox", "fedmedian", "fedtrimmedavg"])
def test_stateless_baseline_resumes(run_config, name):
    strategy = build_strategy({**run_config, "strategy": name})

    strategy.load_state_dict(strategy.state_dict())


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_stateful_baseline_refuses_resume(run_config, name):
    strategy = build_strategy({**run_config, "strategy": name})

    with pytest.raises(ValueError, match="server optimizer state"):
        strategy.load_state_dict(strategy.state_dict())


def test_resume_with_other_strategy_rejected(run_config):
    strategy = build_strategy({**run_config, "strategy": "fedprox"})

    with pytest.raises(ValueError, match="'FedMedian'"):
        strategy.load_state_dict({"strategy": "FedMedian"})


class FixedScores:
    """Stands in for the global evaluator: every model scores the same."""

    def evaluate(self, arrays):
        values = {"loss": 0.7, "accuracy": 0.5, "f1_weighted": 0.4, "ece": 0.1, "num_examples": 10}
        return {"sst2": dict(values), "overall": dict(values)}


def test_round_record_has_measurement(run_config, global_arrays, tmp_path):
    strategy = build_strategy({**run_config, "strategy": "fedtrimmedavg"})
    _, replies = train_round(strategy, run_config, global_arrays)
    received = sum(reply.content["arrays"].count_bytes() for reply in replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    writer = MetricsWriter(tmp_path)
    reporter = RoundReporter(
        run_id=1, strategy_name="fedtrimmedavg", strategy=strategy, num_rounds=1, evaluator=FixedScores(),
        writer=writer, train_log=ClientMetricsLog(), evaluate_log=ClientMetricsLog(),
    )

    reporter(0, global_arrays)
    reporter(1, arrays)

    first, second = read_metrics(writer.path)
    assert (first["aggregation_seconds"], first["bytes_sent"], first["bytes_received"]) == (None, 0, 0)
    assert second["aggregation_seconds"] == strategy.measurements[1].aggregation_seconds
    assert second["bytes_sent"] == len(NODE_IDS) * global_arrays.count_bytes()
    assert second["bytes_received"] == received
    assert second["fusion_seconds"] is None
    assert second["evaluation_seconds"] >= 0
