"""The model of a federated run, built from its run config, for the ClientApp, ServerApp and strategies.

A run either trains the project's own transformer from scratch with the hashing tokenizer,
or fine-tunes a pretrained BERT encoder with its WordPiece tokenizer. The run-config key
``encoder`` chooses, and every part of the job asks :func:`run_model` for the network, its
alignment spec, its tokenizer and the tensors that travel each round, so that no part can
disagree with another.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from otfuse.data_partitions import HashTokenizer
from otfuse.fusion.spec import AlignmentSpec
from otfuse.models import ModelConfig, alignment_spec, build_model, parameter_shapes, save_checkpoint
from otfuse.models import bert, bert_spec
from otfuse.models.bert_tokenizer import WordPieceTokenizer
from otfuse.runconfig import ENCODER, FREEZE_EMBEDDINGS, PRETRAINED_POOLER, SCRATCH_ENCODER, RunConfig

StateDict = dict[str, torch.Tensor]


class Tokenizer(Protocol):
    """Encodes texts as an int64 array of shape (N, max_len), padded with id 0."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class RunModel(ABC):
    """Builds the run's network and tells which of its tensors are exchanged and how they align."""

    @abstractmethod
    def build(self, seed: int | None = None) -> nn.Module:
        """Build the network with its initial weights; with ``seed``, the same on every machine."""

    @abstractmethod
    def alignment_spec(self) -> AlignmentSpec:
        """Return the spec of the exchanged tensors, for the fusion engine."""

    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        """Return the tokenizer whose ids the network reads (hashable, for caches)."""

    @abstractmethod
    def exchanged_state(self, model: nn.Module) -> StateDict:
        """Return the tensors sent between server and clients each round."""

    def load_exchanged(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load received tensors into ``model``; they must be exactly the exchanged ones.

        Raises
        ------
        ValueError
            If a tensor is missing or unexpected, for example because server and client run
            with different ``encoder`` or ``freeze-embeddings`` settings.
        """
        expected = set(self.exchanged_state(model))
        received = set(state_dict)
        if received != expected:
            missing = sorted(expected - received)
            extra = sorted(received - expected)
            detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise ValueError(
                f"received model tensors do not match this node's model ({detail}); run server "
                "and clients with the same encoder and freeze-embeddings settings"
            )
        model.load_state_dict(dict(state_dict), strict=False)

    @abstractmethod
    def save(self, path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
             metadata: Mapping[str, str] | None = None) -> Path:
        """Write a checkpoint of the whole network from its exchanged tensors."""

    @abstractmethod
    def exchanged_bytes(self) -> int:
        """Return the bytes of the exchanged float32 tensors: one model, one direction, one client."""


@dataclass(frozen=True)
class ScratchTransformer(RunModel):
    """The project's pre-LayerNorm transformer, trained from scratch on hashed word ids."""

    config: ModelConfig

    def build(self, seed: int | None = None) -> nn.Module:
        return build_model(self.config, seed=seed)

    def alignment_spec(self) -> AlignmentSpec:
        return alignment_spec(self.config)

    def tokenizer(self) -> Tokenizer:
        return HashTokenizer(vocab_size=self.config.vocab_size, max_len=self.config.max_len)

    def exchanged_state(self, model: nn.Module) -> StateDict:
        return model.state_dict()

    def save(self, path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
             metadata: Mapping[str, str] | None = None) -> Path:
        return save_checkpoint(path, state_dict, self.config, metadata=metadata)

    def exchanged_bytes(self) -> int:
        return 4 * sum(int(np.prod(shape)) for shape in parameter_shapes(self.config).values())


@dataclass(frozen=True)
class PretrainedBert(RunModel):
    """A pretrained BERT encoder with a new head, fine-tuned by the clients.

    With ``freeze_embeddings`` the embedding tables and their LayerNorm keep the
    checkpoint's values and stay out of the exchanged tensors: every node reads them from
    its own copy of the checkpoint, so they need not travel.
    """

    config: bert.BertClassifierConfig
    freeze_embeddings: bool = False

    def build(self, seed: int | None = None) -> nn.Module:
        return bert.build_bert_classifier(self.config, seed=seed, freeze_embeddings=self.freeze_embeddings)

    def alignment_spec(self) -> AlignmentSpec:
        return bert_spec.alignment_spec(self.config, freeze_embeddings=self.freeze_embeddings)

    def tokenizer(self) -> Tokenizer:
        tokenizer = WordPieceTokenizer(self.config.source, max_len=self.config.max_len)
        if tokenizer.pad_id != self.config.pad_token_id:
            raise bert.PretrainedModelError(
                f"the tokenizer of {self.config.source!r} pads with id {tokenizer.pad_id}, but its "
                f"config.json has pad_token_id {self.config.pad_token_id}; fix the checkpoint folder"
            )
        return tokenizer

    def exchanged_state(self, model: nn.Module) -> StateDict:
        return bert.exchanged_state_dict(model, freeze_embeddings=self.freeze_embeddings)

    def save(self, path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
             metadata: Mapping[str, str] | None = None) -> Path:
        model = self.build()
        self.load_exchanged(model, state_dict)
        # The file holds every floating-point tensor, frozen ones too, so it loads on its own.
        full = bert.exchanged_state_dict(model)
        return save_checkpoint(path, full, self.config, metadata=metadata, model_type=bert.MODEL_TYPE)

    def exchanged_bytes(self) -> int:
        shapes = bert_spec.parameter_shapes(self.config, freeze_embeddings=self.freeze_embeddings)
        return 4 * sum(int(np.prod(shape)) for shape in shapes.values())


def model_of_checkpoint(config: ModelConfig | bert.BertClassifierConfig) -> RunModel:
    """Return the model that a checkpoint's config describes, with every tensor exchanged.

    Checkpoints hold every floating-point tensor, frozen ones included, so the pretrained
    model's spec covers the embeddings too.
    """
    if isinstance(config, bert.BertClassifierConfig):
        return PretrainedBert(config)
    return ScratchTransformer(config)


def run_model(config: RunConfig) -> RunModel:
    """Return the model of the run: the scratch transformer or the pretrained encoder.

    For a pretrained encoder, ``model.max-len`` and ``model.pooling`` apply, and the other
    ``model.*`` settings are ignored because the checkpoint fixes the architecture.
    """
    encoder = config.get(ENCODER)
    model_config = config.model_config()
    if encoder == SCRATCH_ENCODER:
        return ScratchTransformer(model_config)
    classifier = bert.BertClassifierConfig(
        source=encoder,
        n_classes=model_config.n_classes,
        max_len=model_config.max_len,
        pooling=model_config.pooling,
        use_pooler=config.get(PRETRAINED_POOLER),
    )
    return PretrainedBert(classifier, freeze_embeddings=config.get(FREEZE_EMBEDDINGS))
