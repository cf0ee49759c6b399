"""Configuration of the encoder-decoder transformer for translation."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otfuse.models.config import ModelConfig

_POSITIVE_INTEGERS = (
    "vocab_size",
    "max_source_len",
    "max_target_len",
    "d_model",
    "n_heads",
    "n_encoder_layers",
    "n_decoder_layers",
    "d_ff",
)
_SPECIAL_IDS = ("pad_id", "bos_id", "eos_id")


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Shape of a :class:`~otfuse.models.seq2seq.Seq2SeqTransformer`.

    ``vocab_size`` is the size of the one tokenizer that source and target share.
    ``max_source_len`` and ``max_target_len`` size the two position tables, and the target
    length counts the begin-of-sequence token that starts every decoder input.
    ``share_embeddings`` makes the encoder and the decoder read one token embedding table,
    which also merges the two residual streams into one alignment group.
    ``tie_output`` computes the output logits with the target token embedding instead of a
    separate output projection. The special ids must match the tokenizer's.
    """

    vocab_size: int = 2048
    max_source_len: int = 32
    max_target_len: int = 33
    d_model: int = 64
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    share_embeddings: bool = False
    tie_output: bool = True
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTEGERS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"seq2seq config {name} must be a positive integer, got {value!r}")
        if self.max_target_len < 2:
            raise ValueError(
                f"seq2seq config max_target_len must be at least 2 (the begin token and one more), "
                f"got {self.max_target_len}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"seq2seq config d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose a d_model that is a multiple of the number of heads"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"seq2seq config dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("share_embeddings", "tie_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"seq2seq config {name} must be True or False, got {getattr(self, name)!r}")
        self._check_special_ids()

    def _check_special_ids(self) -> None:
        ids = [getattr(self, name) for name in _SPECIAL_IDS]
        for name, value in zip(_SPECIAL_IDS, ids):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"seq2seq config {name} must be a token id in [0, {self.vocab_size}), got {value!r}"
                )
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq2seq config pad_id, bos_id and eos_id must differ, got {ids}")

    def block_config(self) -> ModelConfig:
        """Return a classifier config whose attention and MLP shapes equal this model's.

        The encoder reuses the classifier's blocks, and these read only ``d_model``,
        ``n_heads``, ``d_ff`` and ``dropout`` from their config.
        """
        return ModelConfig(
            vocab_size=self.vocab_size,
            max_len=self.max_source_len,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            dropout=self.dropout,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Seq2SeqConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown seq2seq config key {unknown[0]!r}; known keys: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_json(cls, text: str) -> Seq2SeqConfig:
        return cls.from_dict(json.loads(text))
