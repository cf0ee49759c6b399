"""Round checkpoints: the global model, the strategy state and the metrics after every round.

Each round's checkpoint is one safetensors file, ``round-NNNNN.safetensors``, written to a
temporary file and renamed (see :func:`otfuse.models.checkpoint.save_checkpoint`), so a
crash leaves either the previous set of files or a complete new one. The tensors are the
global model, and the file's metadata contains the model config, the run config, the strategy
state and every metrics record up to that round as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import log

from otfuse.models import ModelConfig
from otfuse.models.bert import BertClassifierConfig
from otfuse.models.checkpoint import CheckpointError, read_checkpoint
from otfuse.runconfig import RunConfig, check_resume_compatible
from otfuse.server.outputs import json_safe

CHECKPOINT_DIR = "checkpoints"
ROUND_KEY = "otfuse.round"
RUN_CONFIG_KEY = "otfuse.run_config"
STRATEGY_STATE_KEY = "otfuse.strategy_state"
METRICS_KEY = "otfuse.metrics"
_FILE_PATTERN = re.compile(r"^round-(\d+)\.safetensors$")


@dataclass(frozen=True)
class RoundCheckpoint:
    """A checkpoint read back: the global model after ``server_round`` and the run's state."""

    path: Path
    server_round: int
    state_dict: dict[str, torch.Tensor]
    model_config: ModelConfig | BertClassifierConfig
    run_config: dict[str, Any]
    strategy_state: dict[str, Any]
    metrics: list[dict[str, Any]]


#: Writes a model checkpoint: ``write(path, state_dict, metadata)`` returns the path written.
CheckpointWriter = Callable[[Path, Mapping[str, torch.Tensor], Mapping[str, str]], Path]


class CheckpointStore:
    """Write one checkpoint per round into ``folder`` and keep only the newest ``keep``.

    ``write`` saves the model with its config, for example
    :func:`otfuse.models.save_checkpoint` with the run's model config bound.
    """

    def __init__(self, folder: Path, keep: int, write: CheckpointWriter) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = folder
        self.keep = keep
        self.write = write

    def save(
        self,
        server_round: int,
        state_dict: Mapping[str, torch.Tensor],
        *,
        run_config: Mapping[str, Any],
        strategy_state: Mapping[str, Any],
        metrics: list[Mapping[str, Any]],
    ) -> Path:
        """Write the checkpoint of ``server_round``, then delete all but the newest ``keep``."""
        metadata = {
            ROUND_KEY: str(server_round),
            RUN_CONFIG_KEY: _to_json(run_config),
            STRATEGY_STATE_KEY: _to_json(strategy_state),
            METRICS_KEY: _to_json(metrics),
        }
        path = self.write(self.folder / f"round-{server_round:05d}.safetensors", state_dict, metadata)
        for _, old_path in checkpoint_files(self.folder)[: -self.keep]:
            old_path.unlink(missing_ok=True)
        return path


def _to_json(value: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, sort_keys=True)


def checkpoint_files(folder: Path) -> list[tuple[int, Path]]:
    """Return ``(round, path)`` of every round checkpoint in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _FILE_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def read_round_checkpoint(path: str | os.PathLike) -> RoundCheckpoint:
    """Read one round checkpoint, or raise :class:`CheckpointError` naming what is wrong."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    missing = [key for key in (ROUND_KEY, RUN_CONFIG_KEY, STRATEGY_STATE_KEY, METRICS_KEY) if key not in checkpoint.metadata]
    if missing:
        raise CheckpointError(
            f"{path} is a model checkpoint, not a round checkpoint: its metadata lacks "
            f"{', '.join(missing)}; resume from the checkpoints folder of a run's output folder"
        )
    try:
        server_round = int(checkpoint.metadata[ROUND_KEY])
        run_config = json.loads(checkpoint.metadata[RUN_CONFIG_KEY])
        strategy_state = json.loads(checkpoint.metadata[STRATEGY_STATE_KEY])
        metrics = json.loads(checkpoint.metadata[METRICS_KEY])
    except ValueError as error:
        raise CheckpointError(f"round checkpoint {path} has corrupt metadata: {error}") from error
    if server_round < 0 or not isinstance(run_config, dict) or not isinstance(metrics, list):
        raise CheckpointError(
            f"round checkpoint {path} has corrupt metadata: round {server_round}, run config of "
            f"type {type(run_config).__name__}, metrics of type {type(metrics).__name__}"
        )
    return RoundCheckpoint(
        path=path,
        server_round=server_round,
        state_dict=checkpoint.state_dict,
        model_config=checkpoint.config,
        run_config=run_config,
        strategy_state=strategy_state,
        metrics=metrics,
    )


def latest_checkpoint(location: str | os.PathLike) -> RoundCheckpoint:
    """Return the newest readable round checkpoint at ``location``.

    ``location`` is a run's output folder, its ``checkpoints`` folder or one checkpoint
    file. An unreadable newer file is logged and skipped in favour of the next older one,
    because an interrupted run must continue from its last *complete* round.

    Raises
    ------
    CheckpointError
        If ``location`` contains no round checkpoint, or none of them is readable.
    """
    location = Path(location).expanduser()
    if location.is_file():
        return read_round_checkpoint(location)
    folder = location / CHECKPOINT_DIR if (location / CHECKPOINT_DIR).is_dir() else location
    files = checkpoint_files(folder)
    if not files:
        raise CheckpointError(
            f"no round checkpoint (round-NNNNN.safetensors) found in {folder}; pass the output "
            "folder of a run that finished at least one round"
        )
    errors = []
    for _, path in reversed(files):
        try:
            return read_round_checkpoint(path)
        except CheckpointError as error:
            errors.append(str(error))
            log(WARNING, "Skipping round checkpoint %s: %s", path, error)
    raise CheckpointError(f"none of the {len(files)} round checkpoints in {folder} is readable: {'; '.join(errors)}")


def load_resume_checkpoint(
    location: str | os.PathLike,
    run_config: RunConfig,
    initial_state: Mapping[str, torch.Tensor],
) -> RoundCheckpoint:
    """Return the checkpoint a run resumes from, after checking that it fits the run.

    The saved run config must match ``run_config`` except for the keys in
    :data:`~otfuse.runconfig.RESUMABLE_KEYS`, which covers the model settings, and the
    saved model must have every tensor of ``initial_state`` with its shape and dtype. The
    returned state contains only those tensors: a checkpoint may also hold tensors that
    are not exchanged, such as frozen pretrained embeddings.

    Raises
    ------
    CheckpointError
        For a missing, corrupt or mismatched checkpoint.
    RunConfigError
        For a run config that changes a setting of the saved run.
    """
    checkpoint = latest_checkpoint(location)
    check_resume_compatible(checkpoint.run_config, run_config)
    for name, tensor in initial_state.items():
        saved = checkpoint.state_dict.get(name)
        if saved is None or saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            found = "missing" if saved is None else f"{saved.dtype} {tuple(saved.shape)}"
            raise CheckpointError(
                f"checkpoint {checkpoint.path}: tensor {name!r} is {found}, expected "
                f"{tensor.dtype} {tuple(tensor.shape)}"
            )
    exchanged = {name: checkpoint.state_dict[name] for name in initial_state}
    return dataclasses.replace(checkpoint, state_dict=exchanged)
