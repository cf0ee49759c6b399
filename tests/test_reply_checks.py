"""Reply checks of both strategies: malformed, lost and outlying client replies."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp.strategy import FedAvg

import otfuse.strategies.otfusion as otfusion_module
from flower_helpers import FixedNodesGrid, initial_arrays, run_clients, set_task_identity, tiny_run_config
from otfuse.fusion import FusionOptions
from otfuse.runconfig import load_run_config
from otfuse.strategies import ReplyLimits, ValidatedFedAvg, build_strategy, screen_train_replies

NODE_IDS = (101, 102, 103)
BAD_NODE = NODE_IDS[2]
STRATEGIES = ["otfusion", "fedavg"]


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


def configured(run_config, global_arrays, node_ids=NODE_IDS, **overrides) -> ValidatedFedAvg:
    """Build a strategy and let it sample ``node_ids`` and see the global model, as a round would."""
    strategy = build_strategy({**run_config, **overrides})
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid(node_ids)))
    return strategy


def state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def assert_identical(actual: ArrayRecord, expected: ArrayRecord) -> None:
    actual_state, expected_state = state(actual), state(expected)
    assert list(actual_state) == list(expected_state)
    for name, tensor in expected_state.items():
        assert torch.equal(actual_state[name], tensor), name


def reply_with(reply: Message, content: RecordDict) -> Message:
    """Build a reply from the same node as ``reply`` with other content."""
    instruction = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="train")
    return Message(content, reply_to=instruction)


def with_tensors(reply: Message, change) -> Message:
    values = state(reply.content["arrays"])
    change(values)
    return reply_with(reply, RecordDict({"arrays": ArrayRecord(values), "metrics": reply.content["metrics"]}))


def with_metrics(reply: Message, **changes) -> Message:
    values = dict(reply.content["metrics"])
    values.update(changes)
    metrics = MetricRecord({key: value for key, value in values.items() if value is not None})
    return reply_with(reply, RecordDict({"arrays": reply.content["arrays"], "metrics": metrics}))


def scaled_update(reply: Message, global_arrays: ArrayRecord, factor: float = 50.0) -> Message:
    """Return the reply with its update (its change from the global model) scaled by ``factor``."""
    start = state(global_arrays)

    def scale(values):
        for name, tensor in values.items():
            values[name] = start[name] + factor * (tensor - start[name])

    return with_tensors(reply, scale)


def replaced(name: str, make):
    """Return a change that replaces tensor ``name`` by ``make(old tensor)``."""

    def change(values):
        values[name] = make(values[name])

    return change


def _missing_tensor(reply, _):
    return with_tensors(reply, lambda values: values.pop("head.bias"))


def _extra_tensor(reply, _):
    return with_tensors(reply, lambda values: values.update({"extra.weight": torch.zeros(2)}))


def _wrong_shape(reply, _):
    return with_tensors(reply, replaced("head.weight", lambda tensor: torch.zeros(3, tensor.shape[1])))


def _nan_values(reply, _):
    return with_tensors(reply, replaced("head.weight", lambda tensor: torch.full_like(tensor, float("nan"))))


def _one_infinite_value(reply, _):
    def make(tensor):
        tensor = tensor.clone()
        tensor[0] = float("inf")
        return tensor

    return with_tensors(reply, replaced("blocks.0.mlp.fc1.bias", make))


def _integer_dtype(reply, _):
    return with_tensors(reply, replaced("head.bias", lambda tensor: torch.zeros_like(tensor, dtype=torch.int64)))


def _float64_dtype(reply, _):
    return with_tensors(reply, replaced("head.bias", lambda tensor: tensor.double()))


def _float16_dtype(reply, _):
    return with_tensors(reply, replaced("head.bias", lambda tensor: tensor.half()))


def _renamed_array_record(reply, _):
    return reply_with(reply, RecordDict({"weights": reply.content["arrays"], "metrics": reply.content["metrics"]}))


def _two_array_records(reply, _):
    content = {"arrays": reply.content["arrays"], "more": reply.content["arrays"], "metrics": reply.content["metrics"]}
    return reply_with(reply, RecordDict(content))


def _no_metric_record(reply, _):
    return reply_with(reply, RecordDict({"arrays": reply.content["arrays"]}))


def _examples(value):
    return lambda reply, _: with_metrics(reply, **{"num-examples": value})


# Each row turns node 103's good reply into a bad one. The second value is the tensor that
# the log line and the report must name when the fault is in one tensor.
MALFORMED = [
    pytest.param(_missing_tensor, "head.bias", id="missing-tensor"),
    pytest.param(_extra_tensor, "extra.weight", id="extra-tensor"),
    pytest.param(_wrong_shape, "head.weight", id="wrong-shape"),
    pytest.param(_nan_values, "head.weight", id="nan-values"),
    pytest.param(_one_infinite_value, "blocks.0.mlp.fc1.bias", id="one-infinite-value"),
    pytest.param(_integer_dtype, "head.bias", id="integer-dtype"),
    pytest.param(_float64_dtype, "head.bias", id="float64-dtype"),
    pytest.param(_float16_dtype, "head.bias", id="float16-dtype"),
    pytest.param(_examples(0), None, id="zero-examples"),
    pytest.param(_examples(-5), None, id="negative-examples"),
    pytest.param(_examples(12.5), None, id="fractional-examples"),
    pytest.param(_examples(float("nan")), None, id="nan-examples"),
    pytest.param(_examples(10**12), None, id="absurd-examples"),  # above max-num-examples
    pytest.param(_examples([1.0, 2.0]), None, id="list-examples"),
    pytest.param(_examples(None), None, id="missing-num-examples"),
    pytest.param(lambda reply, _: with_metrics(reply, extra_metric=1.0), None, id="extra-metric-key"),
    pytest.param(_renamed_array_record, None, id="renamed-array-record"),
    pytest.param(_two_array_records, None, id="two-array-records"),
    pytest.param(_no_metric_record, None, id="no-metric-record"),
    pytest.param(scaled_update, None, id="update-norm-outlier"),  # 50 times the others' norm
]


@pytest.mark.parametrize("strategy_name", STRATEGIES)
@pytest.mark.parametrize(("corrupt", "tensor"), MALFORMED)
def test_malformed_reply_rejected(
    run_config, global_arrays, replies, strategy_name, corrupt, tensor, caplog
):
    bad = corrupt(replies[2], global_arrays)
    strategy = configured(run_config, global_arrays, strategy=strategy_name)
    reference = configured(run_config, global_arrays, node_ids=NODE_IDS[:2], strategy=strategy_name)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, [replies[0], replies[1], bad])
    expected, expected_metrics = reference.aggregate_train(1, replies[:2])

    report = strategy.history[1]
    assert report.dropped_nodes == [BAD_NODE]
    assert report.num_models == 2
    assert report.rejections[0]["tensor"] == tensor
    assert f"rejected the reply of node {BAD_NODE} in round 1" in caplog.text
    if tensor is not None:
        assert f"tensor {tensor!r}" in caplog.text
    assert_identical(arrays, expected)
    assert dict(metrics) == dict(expected_metrics)


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_reply_order_does_not_change_result(run_config, global_arrays, replies, strategy_name):
    forward = configured(run_config, global_arrays, strategy=strategy_name)
    backward = configured(run_config, global_arrays, strategy=strategy_name)

    arrays, _ = forward.aggregate_train(1, replies)
    reversed_arrays, _ = backward.aggregate_train(1, list(reversed(replies)))

    assert_identical(arrays, reversed_arrays)


def test_fedavg_math_is_flowers(run_config, global_arrays, replies):
    strategy = configured(run_config, global_arrays, strategy="fedavg")
    checked = screen_train_replies(replies, state(global_arrays), ReplyLimits())

    arrays, metrics = strategy.aggregate_train(1, replies)
    expected, expected_metrics = FedAvg().aggregate_train(1, [update.message for update in checked.accepted])

    assert_identical(arrays, expected)
    assert dict(metrics) == dict(expected_metrics)


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_error_reply_names_lost_node(run_config, global_arrays, replies, strategy_name, caplog):
    strategy = configured(run_config, global_arrays, node_ids=(*NODE_IDS, 104), strategy=strategy_name)
    instruction = Message(RecordDict(), dst_node_id=104, message_type="train")
    failure = Message(Error(code=0, reason="client crashed"), reply_to=instruction)

    with caplog.at_level(logging.INFO, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, [*replies, failure])

    assert arrays is not None
    assert strategy.history[1].num_models == 3
    assert strategy.history[1].failed_nodes == [104]
    assert "Received 3 results and 1 failures" in caplog.text
    assert "lost node 104 in round 1: error reply (code 0: client crashed)" in caplog.text


def test_superlink_error_names_lost_node(run_config, global_arrays, replies, caplog):
    strategy = build_strategy(run_config)
    instructions = list(strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid((*NODE_IDS, 104))))
    for index, instruction in enumerate(instructions):
        # The Grid sets each instruction's id when it sends it.
        instruction.metadata.__dict__["_message_id"] = f"instruction-{index}"
    lost = next(instruction for instruction in instructions if instruction.metadata.dst_node_id == 104)
    # The reply that Flower's SuperLink sends, from its own node id, for a node it lost.
    unavailable = create_message_error_unavailable_res_message(lost.metadata, "node_unavail")

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, [*replies, unavailable])

    assert unavailable.metadata.src_node_id != 104
    assert arrays is not None
    assert strategy.history[1].failed_nodes == [104]
    assert strategy.history[1].missing_nodes == []
    assert "lost node 104 in round 1: error reply" in caplog.text


def test_missing_reply_names_lost_node(run_config, global_arrays, replies, caplog):
    strategy = configured(run_config, global_arrays)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, replies[:2])

    assert arrays is not None
    assert strategy.history[1].missing_nodes == [BAD_NODE]
    assert f"lost node {BAD_NODE} in round 1: no reply before the round timeout" in caplog.text


@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_too_few_replies_skip_round(run_config, global_arrays, replies, strategy_name, caplog):
    strategy = configured(run_config, global_arrays, strategy=strategy_name, **{"min-train-replies": 3})
    bad = with_metrics(replies[2], **{"num-examples": 0})

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, [replies[0], replies[1], bad])

    assert arrays is None
    assert metrics is None
    assert "fewer than min-train-replies=3" in strategy.history[1].skipped
    assert "skipped round 1 because it has 2 usable replies from 3 sampled nodes" in caplog.text


def test_enough_replies_fuse_round(run_config, global_arrays, replies):
    strategy = configured(run_config, global_arrays, **{"min-train-replies": 2})

    arrays, _ = strategy.aggregate_train(1, replies[:2])

    assert arrays is not None
    assert strategy.history[1].skipped is None


def test_norm_check_needs_three_replies(run_config, global_arrays, replies):
    strategy = configured(run_config, global_arrays, node_ids=NODE_IDS[:2])
    outlier = scaled_update(replies[1], global_arrays)

    strategy.aggregate_train(1, [replies[0], outlier])

    assert strategy.history[1].dropped_nodes == []


def test_norm_ratio_is_configurable(run_config, global_arrays, replies):
    strategy = configured(run_config, global_arrays, **{"max-update-norm-ratio": 1e6})
    outlier = scaled_update(replies[2], global_arrays)

    strategy.aggregate_train(1, [replies[0], replies[1], outlier])

    assert strategy.history[1].dropped_nodes == []


def test_plan_failure_falls_back_and_counts(run_config, global_arrays, replies, caplog):
    strategy = configured(run_config, global_arrays)
    # Two Sinkhorn iterations at a tiny regularisation cannot meet the marginal tolerance.
    strategy.fusion_options = FusionOptions(
        alignment="soft", reg=1e-3, max_sinkhorn_iters=2, on_plan_failure="average"
    )
    plain = configured(run_config, global_arrays, **{"fusion.alignment": "none"})

    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, replies)
    expected, _ = plain.aggregate_train(1, replies)

    report = strategy.history[1]
    assert report.num_fallbacks > 0
    assert report.fallback_groups
    assert report.error is None
    assert "plain averaging replaced failed transport plans" in caplog.text
    for name, tensor in state(expected).items():
        assert torch.allclose(state(arrays)[name], tensor, atol=1e-6), name


def test_plan_failure_default_is_average():
    assert load_run_config({}).fusion_options().on_plan_failure == "average"


def test_evaluate_inconsistent_replies_give_none(run_config, global_arrays, caplog):
    strategy = configured(run_config, global_arrays)
    replies = []
    for node_id in NODE_IDS:
        instruction = Message(RecordDict(), dst_node_id=node_id, message_type="evaluate")
        # No "num-examples", so FedAvg's consistency check raises.
        replies.append(Message(RecordDict({"metrics": MetricRecord({"eval_loss": 0.5})}), reply_to=instruction))

    with caplog.at_level(logging.ERROR, logger="flwr"):
        metrics = strategy.aggregate_evaluate(1, replies)

    assert metrics is None
    assert f"evaluation replies of nodes {list(NODE_IDS)} in round 1 are inconsistent" in caplog.text


def test_state_dict_round_trip(run_config, global_arrays, replies):
    strategy = configured(run_config, global_arrays)
    strategy.aggregate_train(1, [replies[0], replies[1], with_metrics(replies[2], **{"num-examples": 0})])
    restored = build_strategy(run_config)

    restored.load_state_dict(strategy.state_dict())

    assert restored.history[1].as_dict() == strategy.history[1].as_dict()


def test_state_dict_of_other_strategy_rejected(run_config):
    fedavg = build_strategy({**run_config, "strategy": "fedavg"})

    with pytest.raises(ValueError, match="belongs to 'ValidatedFedAvg'"):
        build_strategy(run_config).load_state_dict(fedavg.state_dict())


def test_non_finite_fusion_keeps_model(run_config, global_arrays, replies, monkeypatch, caplog):
    strategy = configured(run_config, global_arrays)
    real_fuse = otfusion_module.fuse

    def fuse_with_nan(*args, **kwargs):
        result = real_fuse(*args, **kwargs)
        result.state_dict["head.bias"] = torch.full_like(result.state_dict["head.bias"], float("nan"))
        return result

    monkeypatch.setattr(otfusion_module, "fuse", fuse_with_nan)

    with caplog.at_level(logging.ERROR, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is None
    assert strategy.history[1].error == "fused tensor 'head.bias' contains NaN or infinite values"
    assert "fusion failed in round 1" in caplog.text
