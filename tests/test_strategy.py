"""OTFusion and the strategy factory, fed with real replies of the ClientApp."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

import otfuse.strategies.otfusion as otfusion_module
from flower_helpers import FixedNodesGrid, initial_arrays, run_clients, set_task_identity, tiny_run_config
from otfuse.fusion import FusionError
from otfuse.runconfig import RunConfigError
from otfuse.strategies import ClientMetricsLog, OTFusion, ValidatedFedAvg, build_strategy

NODE_IDS = (101, 102, 103)
ATOL = 1e-5


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


@pytest.fixture(scope="module")
def replies(run_config, global_arrays):
    """Real training replies of three nodes, in node-id order."""
    set_task_identity()
    strategy = build_strategy(run_config)
    messages = sorted(
        strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid(NODE_IDS)),
        key=lambda message: message.metadata.dst_node_id,
    )
    return run_clients(messages, run_config)


def configured(run_config, global_arrays, **overrides) -> OTFusion:
    """Build an OTFusion strategy and let it see the global model, as a round would."""
    strategy = build_strategy({**run_config, **overrides})
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid(NODE_IDS)))
    return strategy


def state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def assert_same_state(actual: ArrayRecord, expected: ArrayRecord, atol: float = ATOL) -> None:
    actual_state, expected_state = state(actual), state(expected)
    assert list(actual_state) == list(expected_state)
    for name, tensor in expected_state.items():
        assert torch.allclose(actual_state[name], tensor, atol=atol), name


def replace_arrays(reply: Message, arrays: ArrayRecord, metrics: MetricRecord | None = None) -> Message:
    """Copy a reply with other arrays (and metrics), keeping its sender."""
    content = RecordDict({"arrays": arrays, "metrics": metrics or reply.content["metrics"]})
    return _reply_from(reply, content)


def _reply_from(reply: Message, content: RecordDict) -> Message:
    instruction = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="train")
    return Message(content, reply_to=instruction)


def test_fused_arrays_match_global_model(run_config, global_arrays, replies):
    strategy = configured(run_config, global_arrays)

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None
    fused, reference = state(arrays), state(global_arrays)
    assert list(fused) == list(reference)
    for name, tensor in reference.items():
        assert fused[name].shape == tensor.shape, name
        assert fused[name].dtype == torch.float32, name
        assert torch.isfinite(fused[name]).all(), name
    assert set(metrics.keys()) == {"train_loss", "train_accuracy", "train_seconds"}
    report = strategy.history[1]
    assert report.num_models == 3
    assert report.dropped_nodes == []
    assert report.fallback_groups == []
    assert report.seconds > 0


def _metrics(reply, **changes):
    values = dict(reply.content["metrics"])
    values.update(changes)
    return MetricRecord(values)


def _nan_tensor(reply):
    values = state(reply.content["arrays"])
    values["head.weight"] = torch.full_like(values["head.weight"], float("nan"))
    return replace_arrays(reply, ArrayRecord(values))


def test_all_replies_malformed_keeps_model(run_config, global_arrays, replies):
    strategy = configured(run_config, global_arrays)

    arrays, metrics = strategy.aggregate_train(1, [_nan_tensor(reply) for reply in replies])

    assert arrays is None
    assert metrics is None
    assert sorted(strategy.history[1].dropped_nodes) == list(NODE_IDS)
    assert "0 usable replies" in strategy.history[1].skipped


def test_fusion_error_keeps_model(run_config, global_arrays, replies, monkeypatch, caplog):
    def failing_fuse(*args, **kwargs):
        raise FusionError("resid", "plan marginals off by 0.5", "raise max_sinkhorn_iters")

    monkeypatch.setattr(otfusion_module, "fuse", failing_fuse)
    strategy = configured(run_config, global_arrays)

    with caplog.at_level(logging.ERROR, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is None
    assert metrics is not None
    assert "FusionError" in strategy.history[1].error
    assert "so the global model stays" in caplog.text


@pytest.mark.parametrize("anchor", ["global", "client"])
def test_no_alignment_equals_fedavg(run_config, global_arrays, replies, anchor):
    strategy = configured(run_config, global_arrays, **{"fusion.alignment": "none", "fusion.anchor": anchor})
    fedavg = configured(run_config, global_arrays, strategy="fedavg")

    arrays, metrics = strategy.aggregate_train(1, replies)
    expected_arrays, expected_metrics = fedavg.aggregate_train(1, replies)

    assert_same_state(arrays, expected_arrays)
    assert dict(metrics) == pytest.approx(dict(expected_metrics))


def _permute_mlp_units(values: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Reorder block 0's MLP hidden units; the network computes the same function."""
    permuted = dict(values)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(values["blocks.0.mlp.fc1.bias"].shape[0]))
    permuted["blocks.0.mlp.fc1.weight"] = values["blocks.0.mlp.fc1.weight"][order]
    permuted["blocks.0.mlp.fc1.bias"] = values["blocks.0.mlp.fc1.bias"][order]
    permuted["blocks.0.mlp.fc2.weight"] = values["blocks.0.mlp.fc2.weight"][:, order]
    return permuted


def test_hard_alignment_undoes_unit_permutation(run_config, global_arrays, replies):
    strategy = configured(run_config, global_arrays, **{"fusion.anchor": "client"})
    original = replies[0]
    heavier = _metrics(original, **{"num-examples": 1000})
    permuted_values = _permute_mlp_units(state(original.content["arrays"]), seed=3)
    anchor_reply = replace_arrays(original, original.content["arrays"], heavier)
    permuted_reply = replace_arrays(replies[1], ArrayRecord(permuted_values), _metrics(replies[1]))

    arrays, _ = strategy.aggregate_train(1, [permuted_reply, anchor_reply])

    assert_same_state(arrays, original.content["arrays"])


def test_configure_train_matches_fedavg(run_config, global_arrays):
    strategy = build_strategy(run_config)
    fedavg = build_strategy({**run_config, "strategy": "fedavg"})
    grid = FixedNodesGrid(NODE_IDS)

    ours = list(strategy.configure_train(2, global_arrays, ConfigRecord(), grid))
    theirs = list(fedavg.configure_train(2, global_arrays, ConfigRecord(), grid))

    assert sorted(m.metadata.dst_node_id for m in ours) == sorted(m.metadata.dst_node_id for m in theirs)
    for message in ours:
        assert message.metadata.message_type == "train"
        assert message.content["config"]["server-round"] == 2
        assert message.content["arrays"] is global_arrays
    assert strategy._global_arrays is global_arrays
    assert strategy._instructions == ours


def test_fedavg_helper_signature_pinned():
    # OTFusion relies on this private FedAvg helper; a Flower upgrade that changes it must fail here.
    parameters = list(inspect.signature(FedAvg._check_and_log_replies).parameters)
    assert parameters == ["self", "replies", "is_train", "validate"]


def test_fedavg_is_flower_fedavg(run_config):
    strategy = build_strategy({**run_config, "strategy": "fedavg", "min-train-nodes": 3, "fraction-train": 0.5})

    assert isinstance(strategy, ValidatedFedAvg)
    assert isinstance(strategy, FedAvg)
    assert strategy.min_train_nodes == 3
    assert strategy.fraction_train == 0.5
    assert strategy.weighted_by_key == "num-examples"


def test_otfusion_takes_fusion_options(run_config):
    strategy = build_strategy(
        {**run_config, "fusion.alignment": "soft", "fusion.reg": 0.1, "fusion.masses": "importance",
         "fusion.anchor": "client", "fusion.barycenter-iters": 2, "fusion.on-plan-failure": "average"}
    )

    assert isinstance(strategy, OTFusion)
    assert strategy.fusion_options.alignment == "soft"
    assert strategy.fusion_options.reg == 0.1
    assert strategy.fusion_options.masses == "importance"
    assert strategy.fusion_options.barycenter_iters == 2
    assert strategy.fusion_options.on_plan_failure == "average"
    assert strategy.anchor == "client"


def test_unknown_strategy_rejected(run_config):
    with pytest.raises(RunConfigError, match="'otfusion', 'fedavg'"):
        build_strategy({**run_config, "strategy": "scaffold"})


def test_no_local_test_disables_evaluation(run_config):
    strategy = build_strategy({**run_config, "local-test-fraction": 0.0})

    assert strategy.fraction_evaluate == 0.0
    assert strategy.min_evaluate_nodes == 0


def test_client_metrics_log_keeps_each_client(replies):
    metrics_log = ClientMetricsLog()
    contents = [reply.content for reply in replies]

    aggregated = metrics_log(contents, "num-examples")

    assert dict(aggregated) == pytest.approx(dict(aggregate_metricrecords(contents, "num-examples")))
    assert len(metrics_log.latest) == 3
    assert metrics_log.latest[0]["num-examples"] == replies[0].content["metrics"]["num-examples"]
    assert len(metrics_log.take()) == 3
    assert metrics_log.take() == []


def test_array_record_conversion_exact(global_arrays):
    values = {name: Array(tensor.numpy()) for name, tensor in state(global_arrays).items()}
    assert_same_state(ArrayRecord(values), global_arrays, atol=0.0)
