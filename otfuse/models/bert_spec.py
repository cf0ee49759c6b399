"""Alignment spec of :class:`~otfuse.models.bert.BertClassifier`, on Hugging Face parameter names.

A BERT layer is post-LayerNorm: with ``h`` the stream that enters the layer,

    h = attention.output.LayerNorm(h + attention.output.dense(attention.self(h)))
    h = output.LayerNorm(h + output.dense(gelu(intermediate.dense(h))))

and the stream starts as ``embeddings.LayerNorm(word + position + token_type)``.

How the residual map differs from the pre-LayerNorm spec of
:mod:`otfuse.models.spec`. Both use one transport map, group ``resid``, for the whole
stream, because every skip-add sums two vectors in the stream's coordinates. In the
pre-LayerNorm model the stream is the raw sum of the embeddings and the branch outputs,
LayerNorms sit on the branch inputs, and a final LayerNorm sits before the head. In BERT
every LayerNorm sits on the stream itself, right after a skip-add, and there is no final
one. A LayerNorm commutes with a permutation of its features, so hard alignment still
recovers a permuted copy exactly. A soft (entropic) map does not commute with it, because
it mixes features before the mean and variance are taken. In the pre-LayerNorm model that
error enters each branch's input only; in BERT it enters the stream after every skip-add.
Each LayerNorm's scale and shift are out axes of ``resid``, so they take part in the cost
of the stream map, like the embedding columns and the rows of the two output projections.

With frozen embeddings the tables are not exchanged, and every model keeps the
checkpoint's tables. Those tables fix the stream's coordinates, so no stream permutation
is a symmetry any more: the spec then has no ``resid`` group, and the stream axes are
exempt (matched by identity). Heads, MLP units and the pooler are still aligned.
"""

from __future__ import annotations

import torch

from otfuse.fusion.spec import AlignmentSpec, SpecBuilder
from otfuse.models.bert import EMBEDDINGS_PREFIX, HEAD, MODEL_TYPE, BertClassifier, BertClassifierConfig

RESIDUAL = "resid"
POOLER = "bert.pooler"


def layer_prefix(layer: int) -> str:
    return f"bert.encoder.layer.{layer}"


def layer_groups(layer: int) -> tuple[str, str, str]:
    """Return the names of the query/key, value/output and MLP groups of layer ``layer``."""
    prefix = layer_prefix(layer)
    return f"{prefix}.attention.qk", f"{prefix}.attention.vo", f"{prefix}.mlp"


def parameter_shapes(config: BertClassifierConfig, *, freeze_embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """Return the shape of every exchanged tensor, without allocating the weights.

    Integer buffers are left out, and so are the embeddings when they are frozen, as in
    :func:`otfuse.models.bert.exchanged_state_dict`.
    """
    with torch.device("meta"):
        model = BertClassifier(config)
    shapes = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if freeze_embeddings and name.startswith(EMBEDDINGS_PREFIX):
            continue
        shapes[name] = tuple(tensor.shape)
    return shapes


def alignment_spec(config: BertClassifierConfig, *, freeze_embeddings: bool = False) -> AlignmentSpec:
    """Describe which transport map acts on each axis of every exchanged tensor.

    * ``resid`` (absent with ``freeze_embeddings``) acts on the feature axis of the word,
      position and token-type tables and on every LayerNorm. It also acts on the input
      columns of the query, key, value, intermediate and pooler (else head) layers, and on
      the rows of the attention output and output dense layers. Vocabulary, position,
      token-type and class rows are exempt.
    * Per layer, query and key rows share one group, so their product is unchanged; the
      value rows and the attention output dense layer's columns share another. Both are
      split into the encoder's heads and tied, so a head moves as a whole.
    * Per layer, the intermediate units form one group.
    * With ``config.use_pooler``, the pooler's units (its rows and the head's columns) form
      one group: tanh acts on each unit alone, so any permutation of them is a symmetry.
    """
    residual = None if freeze_embeddings else RESIDUAL
    builder = SpecBuilder(MODEL_TYPE)
    if residual is not None:
        builder.add_group(residual)
        for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            builder.embedding(f"{EMBEDDINGS_PREFIX}{table}.weight", residual)
        builder.norm(f"{EMBEDDINGS_PREFIX}LayerNorm", residual)
    for layer in range(config.num_layers):
        _add_layer(builder, layer, config.num_heads, residual)
    head_input = residual
    if config.use_pooler:
        builder.add_group(POOLER)
        builder.linear(f"{POOLER}.dense", out_group=POOLER, in_group=residual)
        head_input = POOLER
    builder.linear(HEAD, out_group=None, in_group=head_input)
    return builder.build(parameter_shapes(config, freeze_embeddings=freeze_embeddings))


def _add_layer(builder: SpecBuilder, layer: int, num_heads: int, residual: str | None) -> None:
    qk, vo, mlp = layer_groups(layer)
    prefix = layer_prefix(layer)
    tie = f"{prefix}.attention"
    builder.add_group(qk, num_heads=num_heads, head_tie=tie)
    builder.add_group(vo, num_heads=num_heads, head_tie=tie)
    builder.add_group(mlp)
    builder.linear(f"{prefix}.attention.self.query", out_group=qk, in_group=residual)
    builder.linear(f"{prefix}.attention.self.key", out_group=qk, in_group=residual)
    builder.linear(f"{prefix}.attention.self.value", out_group=vo, in_group=residual)
    builder.linear(f"{prefix}.attention.output.dense", out_group=residual, in_group=vo)
    _norm(builder, f"{prefix}.attention.output.LayerNorm", residual)
    builder.linear(f"{prefix}.intermediate.dense", out_group=mlp, in_group=residual)
    builder.linear(f"{prefix}.output.dense", out_group=residual, in_group=mlp)
    _norm(builder, f"{prefix}.output.LayerNorm", residual)


def _norm(builder: SpecBuilder, prefix: str, residual: str | None) -> None:
    if residual is None:
        # Frozen embeddings pin the stream, so the LayerNorm is averaged entry by entry.
        builder.add_tensor(f"{prefix}.weight", (None,))
        builder.add_tensor(f"{prefix}.bias", (None,))
    else:
        builder.norm(prefix, residual)
