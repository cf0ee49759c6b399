"""Clients narrower than the global model: run config, client handler, reply checks, projections."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from flower_helpers import (
    FixedNodesGrid,
    initial_arrays,
    node_context,
    run_clients,
    set_task_identity,
    tiny_run_config,
    train_message,
)
from otfuse.cli.flower_env import OFFLINE_SWITCHES
from otfuse.client.app import app as client_app
from otfuse.fusion import fuse
from otfuse.fusion.projection import lift, project, truncation_maps
from otfuse.models import alignment_spec, build_model, load_checkpoint, parameter_shapes
from otfuse.models.widths import parse_width_factors, scaled_config
from otfuse.runconfig import RunConfigError, load_run_config
from otfuse.strategies import build_strategy
from otfuse.strategies.widths import NodeProjections
from test_reply_checks import MALFORMED

WIDE_NODE, NARROW_NODE, THIRD_NODE = 201, 202, 203
NODE_IDS = (WIDE_NODE, NARROW_NODE)
# The tiny model has d_model 16 with 2 heads and d_ff 32; factor 0.5 gives 8 and 16.
NARROW_WIDTHS = (8, 16)
FACTORS = "1.0,0.5"


@pytest.fixture(autouse=True)
def task_identity() -> None:
    set_task_identity()


@pytest.fixture(scope="module")
def run_config(data_dir):
    return tiny_run_config(data_dir, **{"client-width-factors": FACTORS})


@pytest.fixture(scope="module")
def global_arrays(run_config):
    set_task_identity()
    return initial_arrays(run_config)


@pytest.fixture(scope="module")
def round_one(run_config, global_arrays):
    """A strategy with widths after round 1, and the replies of a wide and a narrow node."""
    set_task_identity()
    strategy = build_strategy(run_config)
    messages = sorted(
        strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid(NODE_IDS)),
        key=lambda message: message.metadata.dst_node_id,
    )
    replies = run_clients(messages, run_config)
    fused, _ = strategy.aggregate_train(1, replies)
    return strategy, messages, replies, fused


def shapes(arrays: ArrayRecord | dict) -> dict[str, tuple[int, ...]]:
    state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def narrow_config(run_config):
    return scaled_config(load_run_config(run_config).model_config(), 0.5)


# Run config ------------------------------------------------------------------------------


def test_factors_parse_and_default_is_off():
    assert parse_width_factors("1.0, 0.5,") == (1.0, 0.5)
    assert load_run_config({}).width_factors == ()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        pytest.param({"client-width-factors": "1.0,abc"}, "'abc'", id="not-a-number"),
        pytest.param({"client-width-factors": "0"}, "'0'", id="zero"),
        pytest.param({"client-width-factors": "1.5"}, "'1.5'", id="above-one"),
        pytest.param({"client-width-factors": "nan"}, "'nan'", id="nan"),
        pytest.param({"client-width-factors": "0.5", "strategy": "fedavg"}, "strategy='fedavg'", id="fedavg"),
        pytest.param({"client-width-factors": "0.5", "strategy": "fedprox"}, "strategy='fedprox'", id="fedprox"),
        pytest.param({"client-width-factors": "0.5", "strategy": "otfusion-client"},
                     "strategy='otfusion-client'", id="client-side-alignment"),
        pytest.param({"client-width-factors": "0.5", "fusion.anchor": "client"},
                     "fusion.anchor='client'", id="client-anchor"),
        pytest.param({"client-width-factors": "0.5", "fusion.alignment": "none"},
                     "fusion.alignment='none'", id="no-alignment"),
        pytest.param({"client-width-factors": "0.5", "fusion.robust": "drop"},
                     "fusion.robust='drop'", id="robust"),
    ],
)
def test_invalid_width_settings_rejected(overrides, named):
    with pytest.raises(RunConfigError, match="client-width-factors") as error:
        load_run_config(overrides)
    assert named in str(error.value)
    assert 'set client-width-factors to ""' in str(error.value) or "give comma-separated" in str(error.value)


def test_scaled_config_rounds_d_model_to_heads():
    config = load_run_config({"model.d-model": 64, "model.n-heads": 4, "model.d-ff": 256}).model_config()
    narrow = scaled_config(config, 0.3)
    assert (narrow.d_model, narrow.d_ff) == (20, 77)
    assert scaled_config(config, 0.01).d_model == 4
    assert scaled_config(config, 1.0) is config


# Projection ------------------------------------------------------------------------------


def test_truncation_keeps_the_first_units(run_config):
    wide_config = load_run_config(run_config).model_config()
    wide_spec, narrow_spec = alignment_spec(wide_config), alignment_spec(narrow_config(run_config))
    wide = build_model(wide_config, seed=1).state_dict()

    narrow = project(wide, wide_spec, narrow_spec, truncation_maps(narrow_spec, wide_spec))

    d_model, d_ff = NARROW_WIDTHS
    assert torch.equal(narrow["tok_emb.weight"], wide["tok_emb.weight"][:, :d_model])
    assert torch.equal(narrow["blocks.0.mlp.fc1.weight"], wide["blocks.0.mlp.fc1.weight"][:d_ff, :d_model])


def test_project_lift_project_is_consistent(run_config):
    wide_config = load_run_config(run_config).model_config()
    small = narrow_config(run_config)
    wide_spec, narrow_spec = alignment_spec(wide_config), alignment_spec(small)
    wide = build_model(wide_config, seed=1).state_dict()
    maps = fuse([build_model(small, seed=2).state_dict()], [narrow_spec], reference=wide,
                reference_spec=wide_spec).maps[0]

    narrow = project(wide, wide_spec, narrow_spec, maps)
    lifted = lift(narrow, narrow_spec, maps)
    again = project(lifted, wide_spec, narrow_spec, maps)

    assert shapes(narrow) == parameter_shapes(small)
    assert shapes(lifted) == parameter_shapes(wide_config)
    assert all(torch.isfinite(tensor).all() for tensor in lifted.values())
    for name, tensor in narrow.items():
        torch.testing.assert_close(again[name].float(), tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_projection_with_fusion_maps_returns_the_narrow_model(run_config):
    wide_config = load_run_config(run_config).model_config()
    small = narrow_config(run_config)
    wide_spec, narrow_spec = alignment_spec(wide_config), alignment_spec(small)
    narrow = build_model(small, seed=2).state_dict()
    reference = build_model(wide_config, seed=3).state_dict()

    maps = fuse([narrow], [narrow_spec], reference=reference, reference_spec=wide_spec).maps[0]
    back = project(lift(narrow, narrow_spec, maps), wide_spec, narrow_spec, maps)

    for name, tensor in narrow.items():
        torch.testing.assert_close(back[name].float(), tensor, rtol=1e-5, atol=1e-6, msg=name)


# Client ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", ["wide", "narrow"])
def test_narrow_client_trains_its_own_width(run_config, global_arrays, sent):
    small = narrow_config(run_config)
    arrays = global_arrays if sent == "wide" else ArrayRecord(build_model(small, seed=0).state_dict())
    message = train_message(arrays, node_id=NARROW_NODE)

    reply = client_app(message, node_context(NARROW_NODE, 1, 2, run_config))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert shapes(reply.content["arrays"]) == parameter_shapes(small)


def test_wide_partition_keeps_the_global_width(run_config, global_arrays):
    reply = client_app(train_message(global_arrays, node_id=WIDE_NODE), node_context(WIDE_NODE, 0, 2, run_config))
    assert shapes(reply.content["arrays"]) == shapes(global_arrays)


@pytest.mark.parametrize("sent", ["wide", "narrow"])
def test_narrow_client_evaluates_its_own_model(run_config, global_arrays, sent):
    arrays = global_arrays if sent == "wide" else ArrayRecord(build_model(narrow_config(run_config)).state_dict())
    message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=NARROW_NODE, message_type="evaluate")

    reply = client_app(message, node_context(NARROW_NODE, 1, 2, run_config))

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert 0.0 <= reply.content["metrics"]["eval_accuracy"] <= 1.0


def test_client_rejects_a_model_of_other_widths(run_config):
    other = scaled_config(load_run_config(run_config).model_config(), 0.75)
    message = train_message(ArrayRecord(build_model(other).state_dict()), node_id=NARROW_NODE)

    with pytest.raises(ValueError, match="client-width-factors"):
        client_app(message, node_context(NARROW_NODE, 1, 2, run_config))


# Server ----------------------------------------------------------------------------------


def test_narrow_reply_fused_into_global_width(round_one, global_arrays):
    strategy, _, replies, fused = round_one
    assert shapes(replies[1].content["arrays"])["tok_emb.weight"][1] == NARROW_WIDTHS[0]
    report = strategy.history[1]
    assert report.num_models == 2
    assert report.dropped_nodes == []
    assert shapes(fused) == shapes(global_arrays)
    assert strategy.widths.maps[NARROW_NODE][0] == NARROW_WIDTHS
    assert WIDE_NODE not in strategy.widths.maps


def test_narrow_reply_rejected_without_switch(data_dir, round_one, global_arrays):
    _, _, replies, _ = round_one
    strategy = build_strategy(tiny_run_config(data_dir))
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid(NODE_IDS)))

    strategy.aggregate_train(1, replies)

    report = strategy.history[1]
    assert report.dropped_nodes == [NARROW_NODE]
    assert "shape" in report.rejections[0]["reason"]


def test_round_two_sends_each_node_its_width(round_one, run_config):
    strategy, _, _, fused = round_one
    messages = list(strategy.configure_train(2, fused, ConfigRecord(), FixedNodesGrid((*NODE_IDS, THIRD_NODE))))
    by_node = {message.metadata.dst_node_id: message for message in messages}

    narrow = by_node[NARROW_NODE].content["arrays"]
    assert shapes(narrow) == parameter_shapes(narrow_config(run_config))
    assert shapes(by_node[WIDE_NODE].content["arrays"]) == shapes(fused)
    # A node without a fused reply yet gets the wide model and projects it itself.
    assert shapes(by_node[THIRD_NODE].content["arrays"]) == shapes(fused)
    widths, maps = strategy.widths.maps[NARROW_NODE]
    expected = project(fused.to_torch_state_dict(), strategy.widths.spec(strategy.widths.global_widths),
                       strategy.widths.spec(widths), maps)
    for name, tensor in narrow.to_torch_state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert by_node[NARROW_NODE].content["config"]["server-round"] == 2

    evaluate = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(2, fused, ConfigRecord(),
                                                                                 FixedNodesGrid(NODE_IDS))}
    assert shapes(evaluate[NARROW_NODE].content["arrays"]) == shapes(narrow)


def test_round_two_replies_fuse(round_one, run_config):
    strategy, _, _, fused = round_one
    messages = sorted(strategy.configure_train(2, fused, ConfigRecord(), FixedNodesGrid(NODE_IDS)),
                      key=lambda message: message.metadata.dst_node_id)
    replies = [
        client_app(message, node_context(message.metadata.dst_node_id, index, 2, run_config))
        for index, message in enumerate(messages)
    ]

    arrays, _ = strategy.aggregate_train(2, replies)

    assert strategy.history[2].num_models == 2
    assert shapes(arrays) == shapes(fused)


def _narrow_reply(replies, change):
    values = replies[1].content["arrays"].to_torch_state_dict()
    change(values)
    instruction = Message(RecordDict(), dst_node_id=NARROW_NODE, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(values), "metrics": replies[1].content["metrics"]})
    return Message(content, reply_to=instruction)


def _wider_than_global(values):
    values["tok_emb.weight"] = torch.zeros(values["tok_emb.weight"].shape[0], 18)


def _heads_do_not_divide(values):
    values["tok_emb.weight"] = torch.zeros(values["tok_emb.weight"].shape[0], 7)


def _inconsistent_tensor(values):
    values["blocks.0.mlp.fc2.weight"] = torch.zeros(values["blocks.0.mlp.fc2.weight"].shape[0], 12)


@pytest.mark.parametrize(
    ("change", "tensor"),
    [
        pytest.param(_wider_than_global, "tok_emb.weight", id="wider-than-global"),
        pytest.param(_heads_do_not_divide, "tok_emb.weight", id="heads-do-not-divide"),
        pytest.param(_inconsistent_tensor, None, id="inconsistent-narrow-tensor"),
    ],
)
def test_bad_narrow_reply_rejected(round_one, run_config, global_arrays, change, tensor):
    _, _, replies, _ = round_one
    strategy = build_strategy(run_config)
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid(NODE_IDS)))

    strategy.aggregate_train(1, [replies[0], _narrow_reply(replies, change)])

    report = strategy.history[1]
    assert report.dropped_nodes == [NARROW_NODE]
    assert report.num_models == 1
    if tensor is not None:
        assert report.rejections[0]["tensor"] == tensor


@pytest.fixture(scope="module")
def wide_replies(data_dir, global_arrays):
    """Three global-width replies, trained without the switch, as test_reply_checks uses them."""
    set_task_identity()
    config = tiny_run_config(data_dir)
    strategy = build_strategy(config)
    messages = sorted(
        strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid((101, 102, 103))),
        key=lambda message: message.metadata.dst_node_id,
    )
    return run_clients(messages, config)


@pytest.mark.parametrize(("corrupt", "tensor"), MALFORMED)
def test_malformed_reply_rejected_with_switch_on(run_config, global_arrays, wide_replies, corrupt, tensor):
    bad = corrupt(wide_replies[2], global_arrays)
    strategy = build_strategy(run_config)
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), FixedNodesGrid((101, 102, 103))))

    strategy.aggregate_train(1, [wide_replies[0], wide_replies[1], bad])

    report = strategy.history[1]
    assert report.dropped_nodes == [103]
    assert report.rejections[0]["tensor"] == tensor


def test_widths_need_global_anchor(run_config):
    config = load_run_config(run_config)
    with pytest.raises(ValueError, match="anchor='global'"):
        from otfuse.strategies import OTFusion

        OTFusion(alignment_spec(config.model_config()), config.fusion_options(), anchor="client",
                 widths=NodeProjections(config.model_config()))


# End to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_mixed_width_run_keeps_global_width(data_dir, tmp_path):
    output_dir = tmp_path / "run"
    run_config = (
        "datasets='sst2' partitioning='iid' iid-dataset='sst2' max-train-examples=200 "
        "max-test-examples=100 model.vocab-size=512 model.max-len=16 model.d-model=16 "
        f"model.n-heads=2 model.n-layers=1 model.d-ff=32 client-width-factors='{FACTORS}'"
    )
    completed = subprocess.run(
        [
            sys.executable, "-m", "otfuse.cli.main", "run", "--quiet",
            "--strategy", "otfusion", "--data-dir", str(data_dir), "--rounds", "2",
            "--num-clients", "2", "--output-dir", str(output_dir), "--run-config", run_config,
        ],
        env={**os.environ, **OFFLINE_SWITCHES},
        capture_output=True, text=True, timeout=600, check=False,
    )

    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    from otfuse.server.outputs import read_metrics

    records = read_metrics(output_dir / "metrics.jsonl")
    assert [record["fusion"]["num_models"] for record in records[1:]] == [2, 2]
    state_dict, config = load_checkpoint(output_dir / "model.safetensors")
    assert (config.d_model, config.d_ff) == (16, 32)
    assert tuple(state_dict["blocks.0.mlp.fc1.weight"].shape) == (32, 16)
