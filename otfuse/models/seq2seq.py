"""A small pre-LayerNorm encoder-decoder transformer for translation.

The encoder reuses the classifier's blocks (self-attention and MLP). Each decoder block runs
causal self-attention, cross-attention (queries from the decoder stream, keys and values from
the encoder output) and an MLP, each behind its own LayerNorm and added to the decoder stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from otfuse.models.config import ModelConfig
from otfuse.models.encoder import MLP, Block, SelfAttention
from otfuse.models.seq2seq_config import Seq2SeqConfig

# Standard deviation of the initial weights, as in GPT-2. It keeps the initial logits near zero.
INIT_STD = 0.02


class Attention(SelfAttention):
    """Multi-head attention whose keys and values come from ``memory``.

    Pass the same tensor as ``x`` and ``memory`` for self-attention. The parameter names are
    the classifier's (``query``, ``key``, ``value``, ``out``).
    """

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        batch, length, width = x.shape
        q = self.split_heads(self.query(x))  # (B, H, T_query, d_head)
        k = self.split_heads(self.key(memory))  # (B, H, T_key, d_head)
        v = self.split_heads(self.value(memory))
        dropout = self.dropout if self.training else 0.0
        # attn_mask broadcasts to (B, H, T_query, T_key) and is True where a key may be attended.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.out(y)


class DecoderBlock(nn.Module):
    """``x + self_attn(ln1(x))``, then ``x + cross_attn(ln2(x), memory)``, then ``x + mlp(ln3(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.self_attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.cross_attn = Attention(config)
        self.ln3 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor, cross_mask: torch.Tensor
    ) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.self_attn(h, h, self_mask))
        x = x + self.drop(self.cross_attn(self.ln2(x), memory, cross_mask))
        return x + self.drop(self.mlp(self.ln3(x)))


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder transformer with learned position embeddings and final LayerNorms.

    Token id ``config.pad_id`` is padding: padded source positions are never attended to.
    The decoder attends causally, so right-padded target positions never affect real ones.
    ``forward`` takes source ids (B, S) and decoder input ids (B, T) that start with
    ``config.bos_id`` and returns next-token logits of shape (B, T, vocab_size).
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        blocks = config.block_config()
        self.src_emb = nn.Embedding(config.vocab_size, config.d_model)
        # With shared embeddings the decoder reads src_emb too, so there is no tgt_emb.
        self.tgt_emb = None if config.share_embeddings else nn.Embedding(config.vocab_size, config.d_model)
        self.src_pos_emb = nn.Embedding(config.max_source_len, config.d_model)
        self.tgt_pos_emb = nn.Embedding(config.max_target_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.encoder_blocks = nn.ModuleList(Block(blocks) for _ in range(config.n_encoder_layers))
        self.encoder_ln = nn.LayerNorm(config.d_model)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(blocks) for _ in range(config.n_decoder_layers))
        self.decoder_ln = nn.LayerNorm(config.d_model)
        # A tied output reuses the target embedding, so the state dict contains that table once.
        self.lm_head = None if config.tie_output else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(_init_weights)

    @property
    def target_embedding(self) -> nn.Embedding:
        return self.src_emb if self.tgt_emb is None else self.tgt_emb

    def encode(self, source_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the encoder output (B, S, d_model), after its final LayerNorm, and the key mask (B, S)."""
        _check_length(source_ids, self.config.max_source_len, "source", "max_source_len")
        key_mask = source_ids != self.config.pad_id
        # A row of padding only would make attention undefined, so it attends to position 0.
        key_mask[:, 0] = True
        positions = torch.arange(source_ids.shape[1], device=source_ids.device)
        x = self.drop(self.src_emb(source_ids) + self.src_pos_emb(positions))
        for block in self.encoder_blocks:
            x = block(x, key_mask)
        return self.encoder_ln(x), key_mask

    def decode(self, target_ids: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Return next-token logits (B, T, vocab_size) for decoder inputs (B, T) and an encoder output."""
        _check_length(target_ids, self.config.max_target_len, "target", "max_target_len")
        length = target_ids.shape[1]
        positions = torch.arange(length, device=target_ids.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=target_ids.device).tril()
        cross_mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self.drop(self.target_embedding(target_ids) + self.tgt_pos_emb(positions))
        for block in self.decoder_blocks:
            x = block(x, memory, causal, cross_mask)
        x = self.decoder_ln(x)
        if self.lm_head is None:
            return F.linear(x, self.target_embedding.weight)
        return self.lm_head(x)

    def forward(self, source_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        memory, key_mask = self.encode(source_ids)
        return self.decode(target_ids, memory, key_mask)


def _check_length(ids: torch.Tensor, limit: int, side: str, field: str) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{side} ids must have shape (batch, length), got shape {tuple(ids.shape)}")
    if ids.shape[1] > limit:
        raise ValueError(
            f"{side} has {ids.shape[1]} tokens but the model's {field} is {limit}; "
            f"truncate the input or build the model with a larger {field}"
        )


def _init_weights(module: nn.Module) -> None:
    # The classifier's GPT-2 style initialisation (normal, std 0.02), extended to a Linear
    # without bias, which the untied output projection is.
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)


def build_seq2seq(config: Seq2SeqConfig, seed: int | None = None) -> Seq2SeqTransformer:
    """Build a model. With ``seed``, its initial weights are the same on every machine."""
    if seed is None:
        return Seq2SeqTransformer(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Seq2SeqTransformer(config)
