"""Alignment spec of :class:`~otfuse.models.encoder.TransformerClassifier`."""

from __future__ import annotations

import torch

from otfuse.fusion.spec import AlignmentSpec, SpecBuilder
from otfuse.models.config import ModelConfig
from otfuse.models.encoder import TransformerClassifier

MODEL_TYPE = "transformer-classifier"
RESIDUAL = "resid"


def block_groups(layer: int) -> tuple[str, str, str]:
    """Return the names of the query/key, value/output and MLP groups of block ``layer``."""
    prefix = f"blocks.{layer}"
    return f"{prefix}.attn.qk", f"{prefix}.attn.vo", f"{prefix}.mlp"


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Return the shape of every parameter, without allocating the weights."""
    with torch.device("meta"):
        model = TransformerClassifier(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def alignment_spec(config: ModelConfig) -> AlignmentSpec:
    """Describe which transport map acts on each axis of every parameter.

    * One residual-stream group ``resid`` acts on the feature axis of both embedding tables,
      every LayerNorm, the input columns of the query, key, value and first MLP layers, the
      rows of the attention output and second MLP layers, and the input columns of the head.
      Token rows, position rows and class rows are exempt (matched by identity).
    * Per block, the query and key projections share one group, so that the product of queries
      and keys is unchanged by a permutation; the value rows and the output projection's
      columns share another. Both are split into ``n_heads`` heads and tied, so a head moves
      as a whole.
    * Per block, the MLP hidden units form one group.
    """
    builder = SpecBuilder(MODEL_TYPE)
    builder.add_group(RESIDUAL)
    builder.embedding("tok_emb.weight", RESIDUAL)
    builder.embedding("pos_emb.weight", RESIDUAL)
    for layer in range(config.n_layers):
        qk, vo, mlp = block_groups(layer)
        prefix = f"blocks.{layer}"
        tie = f"{prefix}.attn"
        builder.add_group(qk, num_heads=config.n_heads, head_tie=tie)
        builder.add_group(vo, num_heads=config.n_heads, head_tie=tie)
        builder.add_group(mlp)
        builder.norm(f"{prefix}.ln1", RESIDUAL)
        builder.linear(f"{prefix}.attn.query", out_group=qk, in_group=RESIDUAL)
        builder.linear(f"{prefix}.attn.key", out_group=qk, in_group=RESIDUAL)
        builder.linear(f"{prefix}.attn.value", out_group=vo, in_group=RESIDUAL)
        builder.linear(f"{prefix}.attn.out", out_group=RESIDUAL, in_group=vo)
        builder.norm(f"{prefix}.ln2", RESIDUAL)
        builder.linear(f"{prefix}.mlp.fc1", out_group=mlp, in_group=RESIDUAL)
        builder.linear(f"{prefix}.mlp.fc2", out_group=RESIDUAL, in_group=mlp)
    builder.norm("ln_f", RESIDUAL)
    builder.linear("head", out_group=None, in_group=RESIDUAL)
    return builder.build(parameter_shapes(config))
