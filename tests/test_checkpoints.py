"""Checkpoint files: corrupt ones are reported and never half-loaded; round checkpoints resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from otfuse.cli import run_command
from otfuse.cli.errors import CommandError
from otfuse.cli.main import build_parser, main
from otfuse.cli.resume import write_federation
from otfuse.models import ModelConfig, build_model, load_checkpoint, save_checkpoint
from otfuse.models.checkpoint import CheckpointError, read_checkpoint
from otfuse.runconfig import RunConfigError, load_run_config
from otfuse.server.checkpoints import (
    CheckpointStore,
    checkpoint_files,
    latest_checkpoint,
    load_resume_checkpoint,
)

CONFIG = ModelConfig(vocab_size=64, max_len=8, d_model=8, n_heads=2, n_layers=1, d_ff=16, n_classes=2)
RUN_CONFIG = {
    "model.vocab-size": 64, "model.max-len": 8, "model.d-model": 8, "model.n-heads": 2,
    "model.n-layers": 1, "model.d-ff": 16,
}


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return build_model(CONFIG, seed=seed).state_dict()


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "model.safetensors", model_state(), CONFIG, metadata={"note": "x"})


def test_checkpoint_round_trip_exact(checkpoint):
    state_dict, config = load_checkpoint(checkpoint)

    assert config == CONFIG
    for name, tensor in model_state().items():
        assert torch.equal(state_dict[name], tensor), name
    assert read_checkpoint(checkpoint).metadata["note"] == "x"


def test_save_leaves_no_temporary_file(checkpoint):
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == ["model.safetensors"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncate_header(path):
    path.write_bytes(path.read_bytes()[:20])


def _empty(path):
    path.write_bytes(b"")


def _bad_header_length(path):
    # The first 8 bytes give the JSON header's length; this one claims about 18 EB.
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


def _garbled_header(path):
    data = bytearray(path.read_bytes())
    data[8:16] = b"not json"
    path.write_bytes(bytes(data))


def _flipped_tensor_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = [
    pytest.param(_truncate, "truncated or corrupt", id="truncated-half"),
    pytest.param(_truncate_header, "truncated or corrupt", id="truncated-header"),
    pytest.param(_empty, "truncated or corrupt", id="empty-file"),
    pytest.param(_bad_header_length, "truncated or corrupt", id="bad-header-length"),
    pytest.param(_garbled_header, "truncated or corrupt", id="garbled-header"),
    pytest.param(_flipped_tensor_byte, "do not match the SHA-256", id="flipped-tensor-byte"),
]


@pytest.mark.parametrize(("corrupt", "words"), CORRUPTIONS)
def test_corrupt_checkpoint_rejected(checkpoint, corrupt, words):
    corrupt(checkpoint)

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(checkpoint)

    assert str(checkpoint) in str(raised.value)
    assert words in str(raised.value)


def test_missing_checkpoint_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.safetensors")


def write_model(path, state_dict, metadata):
    return save_checkpoint(path, state_dict, CONFIG, metadata)


def new_store(folder, keep) -> CheckpointStore:
    return CheckpointStore(folder, keep=keep, write=write_model)


def save_rounds(store: CheckpointStore, rounds: range) -> None:
    run_config = load_run_config(RUN_CONFIG).to_flower()
    for server_round in rounds:
        store.save(
            server_round,
            model_state(seed=server_round),
            run_config=run_config,
            strategy_state={"strategy": "OTFusion", "history": {}},
            metrics=[{"round": index, "loss": float("nan")} for index in range(server_round + 1)],
        )


def test_store_keeps_last_checkpoints(tmp_path):
    store = new_store(tmp_path / "checkpoints", keep=2)

    save_rounds(store, range(5))

    assert [server_round for server_round, _ in checkpoint_files(store.folder)] == [3, 4]
    assert not [path for path in store.folder.iterdir() if path.name.endswith(".tmp")]


def test_latest_checkpoint_restores_round(tmp_path):
    save_rounds(new_store(tmp_path / "checkpoints", keep=3), range(3))

    checkpoint = latest_checkpoint(tmp_path)

    assert checkpoint.server_round == 2
    assert checkpoint.strategy_state == {"strategy": "OTFusion", "history": {}}
    assert [record["round"] for record in checkpoint.metrics] == [0, 1, 2]
    assert checkpoint.metrics[0]["loss"] is None  # NaN is stored as JSON null
    assert checkpoint.run_config == load_run_config(RUN_CONFIG).to_flower()
    for name, tensor in model_state(seed=2).items():
        assert torch.equal(checkpoint.state_dict[name], tensor), name


def test_corrupt_latest_falls_back_to_older(tmp_path, caplog):
    store = new_store(tmp_path / "checkpoints", keep=3)
    save_rounds(store, range(3))
    newest = checkpoint_files(store.folder)[-1][1]
    _truncate(newest)

    with caplog.at_level(logging.WARNING, logger="flwr"):
        checkpoint = latest_checkpoint(store.folder)

    assert checkpoint.server_round == 1
    assert f"Skipping round checkpoint {newest}" in caplog.text
    assert "truncated or corrupt" in caplog.text


def test_all_corrupt_checkpoints_rejected(tmp_path):
    store = new_store(tmp_path / "checkpoints", keep=2)
    save_rounds(store, range(2))
    for _, path in checkpoint_files(store.folder):
        _bad_header_length(path)

    with pytest.raises(CheckpointError, match="none of the 2 round checkpoints"):
        latest_checkpoint(tmp_path)


def test_empty_folder_has_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no round checkpoint"):
        latest_checkpoint(tmp_path)


def test_model_checkpoint_is_not_round_checkpoint(checkpoint):
    with pytest.raises(CheckpointError, match="not a round checkpoint"):
        latest_checkpoint(checkpoint)


def test_corrupt_metadata_json_rejected(tmp_path):
    path = save_checkpoint(
        tmp_path / "round-00001.safetensors",
        model_state(),
        CONFIG,
        metadata={
            "otfuse.round": "1", "otfuse.run_config": "{", "otfuse.strategy_state": "{}",
            "otfuse.metrics": "[]",
        },
    )

    with pytest.raises(CheckpointError, match="corrupt metadata"):
        latest_checkpoint(path)


def test_resume_checkpoint_must_fit_run(tmp_path):
    save_rounds(new_store(tmp_path / "checkpoints", keep=1), range(2))
    changed = load_run_config({**RUN_CONFIG, "learning-rate": 0.5})

    with pytest.raises(RunConfigError, match="'learning-rate' is 0.5"):
        load_resume_checkpoint(tmp_path, changed, model_state())


def test_resume_checkpoint_must_fit_model(tmp_path):
    save_rounds(new_store(tmp_path / "checkpoints", keep=1), range(2))
    config = load_run_config({**RUN_CONFIG, "num-server-rounds": 5})
    state = model_state()
    state["head.weight"] = torch.zeros(3, 8)

    with pytest.raises(CheckpointError, match="'head.weight' is torch.float32 \\(2, 8\\), expected"):
        load_resume_checkpoint(tmp_path, config, state)


def test_resume_checkpoint_accepts_more_rounds(tmp_path):
    save_rounds(new_store(tmp_path / "checkpoints", keep=1), range(2))
    config = load_run_config({**RUN_CONFIG, "num-server-rounds": 5, "resume-from": str(tmp_path)})

    checkpoint = load_resume_checkpoint(tmp_path, config, model_state())

    assert checkpoint.server_round == 1
    assert json.loads(json.dumps(checkpoint.metrics)) == checkpoint.metrics


# --- otfuse run --resume -----------------------------------------------------------------


@pytest.fixture
def interrupted_run(data_dir, tmp_path):
    """The output folder of a planned run whose checkpoints reach round 1 of 3."""
    output_dir = tmp_path / "run"
    args = build_parser().parse_args([
        "run", "--data-dir", str(data_dir), "--rounds", "3", "--num-clients", "2",
        "--output-dir", str(output_dir), "--run-config", run_config_line(RUN_CONFIG),
        "--run-config", "datasets='sst2' partitioning='iid' max-train-examples=50",
    ])
    plan = run_command.plan_run(args)
    store = new_store(output_dir / "checkpoints", keep=2)
    for server_round in range(2):
        store.save(
            server_round, model_state(), run_config=plan.values,
            strategy_state={"strategy": "OTFusion", "history": {}}, metrics=[],
        )
    write_federation(output_dir, plan.num_clients, plan.client_cpus)
    return output_dir


def run_config_line(values) -> str:
    return " ".join(f"{key}={value}" for key, value in values.items())


def plan_resume(*arguments: str):
    return run_command.plan_run(build_parser().parse_args(["run", *arguments]))


def test_resume_plan_reuses_saved_settings(interrupted_run):
    plan = plan_resume("--resume", str(interrupted_run), "--rounds", "5")

    assert plan.resumed_round == 1
    assert plan.output_dir == interrupted_run
    assert plan.num_clients == 2
    assert plan.num_rounds == 5
    assert plan.values["resume-from"] == str(interrupted_run)
    assert plan.values["output-dir"] == str(interrupted_run)
    assert plan.values["model.d-model"] == 8
    assert plan.values["partitioning"] == "iid"


def test_resume_rejects_changed_setting(interrupted_run):
    with pytest.raises(RunConfigError, match="'learning-rate' is 0.5 but the checkpoint"):
        plan_resume("--resume", str(interrupted_run), "--run-config", "learning-rate=0.5")


def test_resume_rejects_output_dir(interrupted_run, tmp_path):
    with pytest.raises(CommandError, match="--output-dir cannot be combined with --resume"):
        plan_resume("--resume", str(interrupted_run), "--output-dir", str(tmp_path / "other"))


def test_resume_rejects_other_node_count(interrupted_run):
    with pytest.raises(CommandError, match="--num-clients 3 differs from the 2 nodes"):
        plan_resume("--resume", str(interrupted_run), "--num-clients", "3")


def test_resume_without_checkpoint_rejected(tmp_path):
    with pytest.raises(CommandError, match="no round checkpoint"):
        plan_resume("--resume", str(tmp_path))


def test_resume_cli_error_is_one_line(tmp_path, capsys):
    status = main(["run", "--resume", str(tmp_path / "absent")])

    error = capsys.readouterr().err.strip()
    assert status != 0
    assert error.splitlines() == [error]
    assert "is not a folder" in error
