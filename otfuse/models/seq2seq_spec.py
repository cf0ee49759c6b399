"""Alignment spec of :class:`~otfuse.models.seq2seq.Seq2SeqTransformer`.

How the two residual streams are threaded
-----------------------------------------
The encoder and the decoder each add their blocks' outputs to their own residual stream, so
each stream gets one transport map, shared by every read and write of that stream:

* ``encoder.resid`` acts on the feature axis of ``src_emb`` and ``src_pos_emb`` and on every
  encoder LayerNorm, including ``encoder_ln``. It also acts on the input columns of the
  encoder's query, key, value and first MLP layers, and on the rows of its attention-output
  and second MLP layers. The decoder reads ``encoder_ln``'s output, which is in this
  stream's units, so the map also acts on the input columns of every decoder
  cross-attention key and value projection.
* ``decoder.resid`` acts on the feature axis of ``tgt_emb`` and ``tgt_pos_emb`` and on the
  three LayerNorms of every decoder block and ``decoder_ln``. It acts on the input columns
  of the self-attention query, key and value, of the cross-attention query, of the first
  MLP layer and of ``lm_head``. It acts on the rows of the self-attention, cross-attention
  and second MLP output layers. With a tied output the logits reuse ``tgt_emb``, whose
  feature axis is already in this group.

Groups are solved in declaration order: the encoder stream, the encoder blocks, the decoder
stream, then the decoder blocks. A cross-attention's query/key group is described by the
query rows (decoder stream) and the key rows (encoder stream), and both maps are solved
before it.

With ``share_embeddings`` one token table feeds both streams, and one table axis can carry
only one map, so the two streams become a single group, ``resid``. Everything else is
unchanged.

Per attention layer, the query and key rows share one group and the value rows and output
columns another. Both are split into heads and tied, so a head moves as a whole. Token and
position rows are exempt (matched by identity).
"""

from __future__ import annotations

import torch

from otfuse.fusion.spec import AlignmentSpec, SpecBuilder
from otfuse.models.seq2seq import Seq2SeqTransformer
from otfuse.models.seq2seq_config import Seq2SeqConfig

MODEL_TYPE = "seq2seq-transformer"
ENCODER_STREAM = "encoder.resid"
DECODER_STREAM = "decoder.resid"
SHARED_STREAM = "resid"

# Prefixes of the encoder's parameters. With shared embeddings, src_emb also feeds the
# decoder, but encoder_tensor_names still counts it as the encoder's.
_ENCODER_PREFIXES = ("src_emb.", "src_pos_emb.", "encoder_blocks.", "encoder_ln.")


def stream_groups(config: Seq2SeqConfig) -> tuple[str, str]:
    """Return the group names of the encoder stream and the decoder stream (equal when shared)."""
    if config.share_embeddings:
        return SHARED_STREAM, SHARED_STREAM
    return ENCODER_STREAM, DECODER_STREAM


def parameter_shapes(config: Seq2SeqConfig) -> dict[str, tuple[int, ...]]:
    """Return the shape of every parameter, without allocating the weights."""
    with torch.device("meta"):
        model = Seq2SeqTransformer(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def encoder_tensor_names(config: Seq2SeqConfig) -> list[str]:
    """List the parameters of the encoder side: source embeddings, encoder blocks, ``encoder_ln``."""
    return [name for name in parameter_shapes(config) if name.startswith(_ENCODER_PREFIXES)]


def _attention(builder: SpecBuilder, prefix: str, n_heads: int, query_stream: str,
               memory_stream: str, out_stream: str) -> None:
    """Add one attention layer: tied, head-split query/key and value/output groups."""
    qk, vo = f"{prefix}.qk", f"{prefix}.vo"
    builder.add_group(qk, num_heads=n_heads, head_tie=prefix)
    builder.add_group(vo, num_heads=n_heads, head_tie=prefix)
    builder.linear(f"{prefix}.query", out_group=qk, in_group=query_stream)
    builder.linear(f"{prefix}.key", out_group=qk, in_group=memory_stream)
    builder.linear(f"{prefix}.value", out_group=vo, in_group=memory_stream)
    builder.linear(f"{prefix}.out", out_group=out_stream, in_group=vo)


def _mlp(builder: SpecBuilder, prefix: str, stream: str) -> None:
    builder.add_group(prefix)
    builder.linear(f"{prefix}.fc1", out_group=prefix, in_group=stream)
    builder.linear(f"{prefix}.fc2", out_group=stream, in_group=prefix)


def alignment_spec(config: Seq2SeqConfig) -> AlignmentSpec:
    """Describe which transport map acts on each axis of every parameter (see the module docstring)."""
    encoder_stream, decoder_stream = stream_groups(config)
    builder = SpecBuilder(MODEL_TYPE)

    builder.add_group(encoder_stream)
    builder.embedding("src_emb.weight", encoder_stream)
    builder.embedding("src_pos_emb.weight", encoder_stream)
    for layer in range(config.n_encoder_layers):
        prefix = f"encoder_blocks.{layer}"
        builder.norm(f"{prefix}.ln1", encoder_stream)
        _attention(builder, f"{prefix}.attn", config.n_heads, encoder_stream, encoder_stream, encoder_stream)
        builder.norm(f"{prefix}.ln2", encoder_stream)
        _mlp(builder, f"{prefix}.mlp", encoder_stream)
    builder.norm("encoder_ln", encoder_stream)

    if decoder_stream != encoder_stream:
        builder.add_group(decoder_stream)
        builder.embedding("tgt_emb.weight", decoder_stream)
    builder.embedding("tgt_pos_emb.weight", decoder_stream)
    for layer in range(config.n_decoder_layers):
        prefix = f"decoder_blocks.{layer}"
        builder.norm(f"{prefix}.ln1", decoder_stream)
        _attention(builder, f"{prefix}.self_attn", config.n_heads, decoder_stream, decoder_stream, decoder_stream)
        builder.norm(f"{prefix}.ln2", decoder_stream)
        # Cross-attention: queries read the decoder stream, keys and values the encoder output.
        _attention(builder, f"{prefix}.cross_attn", config.n_heads, decoder_stream, encoder_stream, decoder_stream)
        builder.norm(f"{prefix}.ln3", decoder_stream)
        _mlp(builder, f"{prefix}.mlp", decoder_stream)
    builder.norm("decoder_ln", decoder_stream)
    if not config.tie_output:
        builder.linear("lm_head", out_group=None, in_group=decoder_stream, bias=False)
    return builder.build(parameter_shapes(config))
