"""A small pre-LayerNorm transformer encoder for sequence classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from otfuse.models.config import ModelConfig

PAD_ID = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key = nn.Linear(config.d_model, config.d_model)
        self.value = nn.Linear(config.d_model, config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q = self.split_heads(self.query(x))  # (B, H, T, d_head)
        k = self.split_heads(self.key(x))
        v = self.split_heads(self.value(x))
        attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, T): True where a key may be attended
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerClassifier(nn.Module):
    """Token and learned position embeddings, pre-LayerNorm blocks, final LayerNorm, pooling, head.

    Token id 0 is padding: padded positions are never attended to and are left out of mean
    pooling. ``forward`` takes ``input_ids`` of shape (B, T) with T <= ``max_len`` and returns
    logits of shape (B, n_classes).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.n_classes)
        self.apply(_init_weights)

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the final-LayerNorm hidden states (B, T, d_model) and the key mask (B, T)."""
        batch, length = input_ids.shape
        if length > self.config.max_len:
            raise ValueError(
                f"input has {length} tokens but the model's max_len is {self.config.max_len}; "
                "truncate the input or build the model with a larger max_len"
            )
        key_mask = input_ids != PAD_ID
        # A row of padding only would make attention undefined; let it attend to position 0.
        key_mask[:, 0] = True
        positions = torch.arange(length, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln_f(x), key_mask

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, key_mask = self.encode(input_ids)
        if self.config.pooling == "first":
            pooled = hidden[:, 0]
        else:
            weights = key_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1)
        return self.head(pooled)


def _init_weights(module: nn.Module) -> None:
    # Small normal initialisation as in GPT-2; 0.02 keeps the initial logits near zero.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def build_model(config: ModelConfig, seed: int | None = None) -> TransformerClassifier:
    """Build a model; with ``seed`` its initial weights are the same on every machine."""
    if seed is None:
        return TransformerClassifier(config)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return TransformerClassifier(config)
    finally:
        torch.random.set_rng_state(generator_state)
