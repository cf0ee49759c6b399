"""Configuration of the transformer encoder classifier."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

POOLING_CHOICES = ("mean", "first")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a :class:`~otfuse.models.encoder.TransformerClassifier`.

    The defaults make a model of about 1.1 M parameters (most of them in the token embedding)
    that trains on a few thousand sentences per minute on two CPU cores.
    """

    vocab_size: int = 16384
    max_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    n_classes: int = 2
    dropout: float = 0.1
    pooling: str = "mean"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "d_model", "n_heads", "n_layers", "d_ff", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config {name} must be a positive integer, got {value!r}")
        if self.n_classes < 2:
            raise ValueError(f"model config n_classes must be at least 2, got {self.n_classes}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model config d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose a d_model that is a multiple of the number of heads"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model config dropout must be in [0, 1), got {self.dropout!r}")
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(
                f"model config pooling must be one of {POOLING_CHOICES}, got {self.pooling!r}"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key {unknown[0]!r}; known keys: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
