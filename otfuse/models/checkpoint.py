"""Safetensors checkpoints that carry their model config in the metadata."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from otfuse.models.bert import MODEL_TYPE as BERT_MODEL_TYPE
from otfuse.models.bert import BertClassifierConfig
from otfuse.models.config import ModelConfig

CONFIG_KEY = "otfuse.model_config"
MODEL_TYPE_KEY = "otfuse.model_type"
TRANSFORMER_MODEL_TYPE = "transformer-classifier"


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
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=header)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], ModelConfig | BertClassifierConfig]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError` if unusable.

    The config is a :class:`BertClassifierConfig` for a pretrained-encoder checkpoint, whose
    encoder folder must exist on this machine, and a :class:`ModelConfig` otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
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
    config_class = BertClassifierConfig if metadata.get(MODEL_TYPE_KEY) == BERT_MODEL_TYPE else ModelConfig
    try:
        config = config_class.from_json(metadata[CONFIG_KEY])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model config: {error}") from error
    return state_dict, config
