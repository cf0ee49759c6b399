"""Safetensors checkpoints that carry their model config in the metadata."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from otfuse.models.bert import MODEL_TYPE as BERT_MODEL_TYPE
from otfuse.models.bert import BertClassifierConfig
from otfuse.models.config import ModelConfig

CONFIG_KEY = "otfuse.model_config"
MODEL_TYPE_KEY = "otfuse.model_type"
TRANSFORMER_MODEL_TYPE = "transformer-classifier"
#: SHA-256 of the tensors, because safetensors detects a truncated file but not changed bytes.
DIGEST_KEY = "otfuse.tensors_sha256"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or lacks the model config."""


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig | BertClassifierConfig,
    metadata: Mapping[str, str] | None = None,
    model_type: str = TRANSFORMER_MODEL_TYPE,
) -> Path:
    """Write ``state_dict`` and ``config`` atomically: to a temporary file, then rename.

    ``model_type`` tells :func:`load_checkpoint` which config class to read back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {CONFIG_KEY: config.to_json(), MODEL_TYPE_KEY: model_type}
    header.update(metadata or {})
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    header[DIGEST_KEY] = tensors_digest(tensors)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=header)
        # Sync the data before the rename and the folder after it, so that a power loss
        # leaves either the old file or the complete new one.
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _fsync(path: str | os.PathLike) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Return the SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """The complete content of a checkpoint file: weights, model config and string metadata."""

    state_dict: dict[str, torch.Tensor]
    config: ModelConfig | BertClassifierConfig
    metadata: dict[str, str]


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], ModelConfig | BertClassifierConfig]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError` if unusable.

    The config is a :class:`BertClassifierConfig` for a pretrained-encoder checkpoint, whose
    encoder folder must exist on this machine, and a :class:`ModelConfig` otherwise.
    """
    checkpoint = read_checkpoint(path)
    return checkpoint.state_dict, checkpoint.config


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint with all its metadata, or raise :class:`CheckpointError`.

    Nothing is returned from a file that is truncated, has a corrupt header, lacks the
    model config, or whose tensors do not match the SHA-256 stored at save time (files
    written before the digest existed are read without that check).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file ({error}); it may be "
            "truncated or corrupt"
        ) from error
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no {CONFIG_KEY!r} metadata; save it with "
            "otfuse.models.save_checkpoint so that the model config travels with the weights"
        )
    expected_digest = metadata.get(DIGEST_KEY)
    if expected_digest is not None and tensors_digest(state_dict) != expected_digest:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: its tensors do not match the SHA-256 "
            "stored when it was written; use an older checkpoint or retrain"
        )
    config_class = BertClassifierConfig if metadata.get(MODEL_TYPE_KEY) == BERT_MODEL_TYPE else ModelConfig
    try:
        config = config_class.from_json(metadata[CONFIG_KEY])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model config: {error}") from error
    return Checkpoint(state_dict=state_dict, config=config, metadata=metadata)
