"""A tiny BERT checkpoint folder for tests: random weights, config.json and a WordPiece vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_ENCODER = {
    "model_type": "bert",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 24,
    "max_position_embeddings": 20,
    "type_vocab_size": 2,
    "pad_token_id": 0,
    "hidden_act": "gelu",
    "initializer_range": 0.5,
}
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "film", "very"]


def write_checkpoint(folder: Path, encoder: dict, *, prefix: str = "", file: str = "model.safetensors",
                     seed: int = 0) -> Path:
    """Write a randomly initialised BertModel as a checkpoint folder with a WordPiece vocabulary."""
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(encoder))
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**encoder), add_pooling_layer=True)
    weights = {f"{prefix}{name}": tensor.contiguous() for name, tensor in model.state_dict().items()}
    weights[f"{prefix}embeddings.position_ids"] = torch.arange(encoder["max_position_embeddings"])[None]
    if file.endswith(".bin"):
        torch.save(weights, folder / file)
    else:
        save_file(weights, str(folder / file))
    return folder
