"""Client-side alignment under Flower's SecAgg+ secure aggregation (``secagg.enabled``)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from flower_helpers import (
    RUN_ID,
    FixedNodesGrid,
    node_context,
    set_task_identity,
    tiny_run_config,
    train_message,
)
from otfuse.cli.flower_env import OFFLINE_SWITCHES
from otfuse.client.app import app as client_app
from otfuse.client.local_update import local_update
from otfuse.client.secagg import check_clipping, secagg_when_requested
from otfuse.models import load_checkpoint
from otfuse.runconfig import RunConfigError, load_run_config
from otfuse.server.checkpoints import read_round_checkpoint
from otfuse.server.outputs import read_metrics
from otfuse.server.secagg import rounding_error_bound, run_secure_rounds
from otfuse.strategies import ClientMetricsLog
from otfuse.task import run_model

NUM_CLIENTS = 3
# The mean is cast back to float32, which adds half a unit in the last place: 2.4e-7 at 4.
FLOAT32_ROUNDING = 1e-6
# Each client of tiny_run_config has 180 training rows (200 minus the 10 % local test part).
MAX_WEIGHT = 200.0


def secure_config(data_dir: Path, **overrides) -> dict:
    return tiny_run_config(
        data_dir,
        **{
            "strategy": "otfusion-client",
            "secagg.enabled": True,
            "secagg.max-weight": MAX_WEIGHT,
            "min-train-nodes": NUM_CLIENTS,
            "min-available-nodes": NUM_CLIENTS,
            **overrides,
        },
    )


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        # The server cannot fuse what it cannot see.
        ({"secagg.enabled": True}, ["'otfusion'", "strategy=otfusion-client", "secagg.enabled=false"]),
        ({"secagg.enabled": True, "strategy": "fedavg"}, ["'fedavg'", "strategy=otfusion-client"]),
        # Flower's workflow starts at round 1.
        (
            {"secagg.enabled": True, "strategy": "otfusion-client", "resume-from": "/tmp/run"},
            ["resume-from", "new run"],
        ),
        # A threshold of all shares tolerates no dropout and Flower rejects it.
        (
            {"strategy": "otfusion-client", "secagg.enabled": True, "secagg.reconstruction-threshold": 3},
            ["secagg.reconstruction-threshold", "below secagg.num-shares (3)"],
        ),
        ({"secagg.num-shares": 2}, ["secagg.num-shares", ">= 3"]),
        ({"secagg.reconstruction-threshold": 1}, ["secagg.reconstruction-threshold", ">= 2"]),
        ({"secagg.clipping-range": 0.0}, ["secagg.clipping-range", "> 0"]),
        ({"secagg.max-weight": -1.0}, ["secagg.max-weight", "> 0"]),
        ({"secagg.enabled": "yes"}, ["secagg.enabled", "true or false"]),
    ],
    ids=[
        "otfusion", "fedavg", "resume", "threshold-not-below-shares", "two-shares",
        "threshold-one", "zero-clipping", "negative-max-weight", "string-switch",
    ],
)
def test_invalid_secagg_settings_rejected(settings, words):
    with pytest.raises(RunConfigError) as error:
        load_run_config(settings)
    for word in words:
        assert word in str(error.value)


def test_secagg_accepted_with_client_alignment():
    config = load_run_config({"strategy": "otfusion-client", "secagg.enabled": True, "secagg.num-shares": 5,
                              "secagg.reconstruction-threshold": 3})
    assert config.values["secagg.enabled"] is True
    assert load_run_config({}).values["secagg.enabled"] is False


def test_wrapper_passes_ordinary_train_messages_through():
    set_task_identity()
    message = train_message(ArrayRecord([np.ones(3, dtype=np.float32)]), node_id=5)
    before = {key: type(record) for key, record in message.content.items()}
    context = node_context(5, 0, 2, {})
    seen = []

    def call_next(msg: Message, ctx) -> Message:
        seen.append((msg, ctx))
        return Message(msg.content, reply_to=msg)

    reply = secagg_when_requested(message, context, call_next)

    assert seen == [(message, context)]
    assert {key: type(record) for key, record in reply.content.items()} == before
    assert RECORD_KEY_CONFIGS not in reply.content.config_records
    # secaggplus_mod keeps its protocol state in context.state; nothing was added.
    assert len(context.state) == 0


def test_wrapper_runs_secaggplus_on_protocol_messages():
    set_task_identity()
    message = train_message(ArrayRecord([np.ones(3, dtype=np.float32)]), node_id=5)
    # A fresh node expects the setup stage first, so secaggplus_mod rejects share_keys.
    message.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "share_keys"})

    with pytest.raises(ValueError, match="stage"):
        secagg_when_requested(message, node_context(5, 0, 2, {}), lambda msg, ctx: msg)


def test_clipping_check_names_the_fix(data_dir):
    config = load_run_config(secure_config(data_dir, **{"secagg.clipping-range": 1.0}))
    state = {"w": torch.tensor([0.5, -3.0])}

    check_clipping(state, 60, config)  # 3.0 * 60 / 200 = 0.9 fits in 1.0
    with pytest.raises(ValueError, match="secagg.clipping-range to at least"):
        check_clipping(state, 180, config)  # 3.0 * 180 / 200 = 2.7 does not


def test_rounding_error_bound_shrinks_with_examples():
    small = rounding_error_bound([180, 180, 180], 8.0, 200.0)
    assert small == pytest.approx(6.4e-6, rel=0.01)
    assert rounding_error_bound([180, 180, 180], 8.0, 3000.0) > 10 * small


class ClientAppGrid(FixedNodesGrid):
    """A Grid that delivers every message to the ClientApp in this process.

    Each node keeps its own Context across messages, as a SuperNode does, because
    ``secaggplus_mod`` keeps its protocol state there. Node ``i`` of ``node_ids`` is
    partition ``i``.
    """

    def __init__(self, node_ids, run_config) -> None:
        super().__init__(node_ids)
        self.contexts = {
            node: node_context(node, index, len(node_ids), run_config) for index, node in enumerate(node_ids)
        }
        self.stages: list[str] = []

    @property
    def run(self):
        return SimpleNamespace(run_id=RUN_ID)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            stage = message.content.config_records[RECORD_KEY_CONFIGS]["stage"]
            self.stages.append(str(stage))
            # A real transport serialises each message; secaggplus_mod edits the one it gets,
            # and the workflow sends the same content object to every node.
            replies.append(client_app(copy.deepcopy(message), self.contexts[message.metadata.dst_node_id]))
        return replies


def test_secure_round_equals_aligned_mean(data_dir):
    """Run SecAgg+ in this process and compare with the exact mean of the aligned models."""
    set_task_identity()
    run_config = secure_config(data_dir, **{"num-server-rounds": 1})
    config = load_run_config(run_config)
    task = run_model(config)
    initial = ArrayRecord(task.exchanged_state(task.build(seed=0)))
    grid = ClientAppGrid([11, 22, 33], run_config)
    reported = {}

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        reported[server_round] = arrays.to_torch_state_dict()
        return MetricRecord({"overall_loss": 0.0})

    final = run_secure_rounds(
        grid, grid.contexts[11], config, initial, on_round_end=on_round_end, train_log=ClientMetricsLog()
    )

    # Four protocol stages, each sent to the three nodes.
    assert grid.stages == [stage for stage in ("setup", "share_keys", "collect_masked_vectors", "unmask")
                           for _ in range(NUM_CLIENTS)]
    assert sorted(reported) == [0, 1]
    received = initial.to_torch_state_dict()
    # Training is seeded per partition and round, so this repeats each client's update.
    updates = [
        local_update(config, node_context(node, index, NUM_CLIENTS, run_config), received, 1)
        for index, node in enumerate((11, 22, 33))
    ]
    bound = rounding_error_bound([update.num_examples for update in updates], 8.0, MAX_WEIGHT)
    secure = final.to_torch_state_dict()
    assert {tensor.dtype for tensor in secure.values()} == {torch.float32}
    assert largest_difference_to_mean(secure, updates) <= bound + FLOAT32_ROUNDING
    assert torch.equal(secure["head.weight"], reported[1]["head.weight"])


def largest_difference_to_mean(state, updates) -> float:
    """Return the largest difference between ``state`` and the example-weighted mean of ``updates``."""
    total = sum(update.num_examples for update in updates)
    largest = 0.0
    for name, tensor in state.items():
        mean = sum(update.state[name].double() * update.num_examples for update in updates) / total
        largest = max(largest, float((tensor.double() - mean).abs().max()))
    return largest


E2E_ROUNDS = 2
# 3 IID shards of SST-2 with 1000 rows each (900 of them for training); max-weight is the
# rows per node.
E2E_MAX_WEIGHT = 1000.0
E2E_RUN_CONFIG = (
    "datasets='sst2' partitioning='iid' iid-dataset='sst2' max-train-examples=1000 "
    "max-test-examples=0 local-epochs=2 model.vocab-size=4096 model.max-len=32 model.d-model=32 "
    "model.n-heads=2 model.n-layers=1 model.d-ff=64 min-available-nodes=3 min-train-nodes=3 "
    f"secagg.enabled=true secagg.max-weight={E2E_MAX_WEIGHT}"
)


@pytest.mark.slow
def test_secure_run_averages_client_aligned_models(data_dir, tmp_path):
    output_dir = tmp_path / "run"
    completed = subprocess.run(
        [
            sys.executable, "-m", "otfuse.cli.main", "run", "--quiet",
            "--strategy", "otfusion-client", "--data-dir", str(data_dir), "--rounds", str(E2E_ROUNDS),
            "--num-clients", str(NUM_CLIENTS), "--output-dir", str(output_dir),
            "--run-config", E2E_RUN_CONFIG,
        ],
        env={**os.environ, **OFFLINE_SWITCHES},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]

    records_written = read_metrics(output_dir / "metrics.jsonl")
    assert [record["round"] for record in records_written] == list(range(E2E_ROUNDS + 1))
    assert {record["strategy"] for record in records_written} == {"otfusion-client"}
    assert len(records_written[-1]["client_train"]) == NUM_CLIENTS
    assert all("alignment_cost" in client for client in records_written[-1]["client_train"])
    # Measured 0.696 on the 872 validation rows with the default seed; the majority class is 0.51.
    assert records_written[-1]["overall"]["accuracy"] > 0.60
    log_text = (output_dir / "flower.log").read_text(errors="replace")
    assert log_text.count("Secure aggregation completed.") == E2E_ROUNDS
    assert log_text.count("aggregate_fit: SecAgg+ mean of 3 client-aligned models") == E2E_ROUNDS

    # Repeat round 2 of every client from the round-1 checkpoint. Training is seeded per
    # partition and round, and the aligned models come out the same.
    checkpoint = read_round_checkpoint(output_dir / "checkpoints" / "round-00001.safetensors")
    run_config = load_run_config(checkpoint.run_config)
    task = run_model(run_config)
    received = {name: checkpoint.state_dict[name] for name in task.exchanged_state(task.build())}
    updates = [
        local_update(
            run_config, node_context(index, index, NUM_CLIENTS, run_config.to_flower()), received, E2E_ROUNDS
        )
        for index in range(NUM_CLIENTS)
    ]
    final, _ = load_checkpoint(output_dir / "model.safetensors")
    bound = rounding_error_bound([update.num_examples for update in updates], 8.0, E2E_MAX_WEIGHT)
    assert largest_difference_to_mean(final, updates) <= bound + FLOAT32_ROUNDING
