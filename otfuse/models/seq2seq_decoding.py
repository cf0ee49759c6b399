"""Greedy and beam-search decoding for :class:`~otfuse.models.seq2seq.Seq2SeqTransformer`.

Both decoders run the whole decoder prefix again at every step (no key/value cache). That
costs time quadratic in the output length, which is small for the sentence lengths used here.
"""

from __future__ import annotations

import torch

from otfuse.models.seq2seq import Seq2SeqTransformer
from otfuse.models.seq2seq_config import Seq2SeqConfig

# Default exponent of the length normalisation in beam search: 1.0 ranks finished
# hypotheses by mean log-probability per token, 0.0 by total log-probability.
DEFAULT_LENGTH_PENALTY = 1.0


def _check_max_len(model: Seq2SeqTransformer, max_len: int) -> None:
    limit = model.config.max_target_len
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len <= limit:
        raise ValueError(
            f"max_len must be an integer in [1, {limit}] (the model's max_target_len), got {max_len!r}"
        )


def _strip(rows: torch.Tensor, eos_id: int, pad_id: int) -> list[list[int]]:
    """Cut each row (without the begin token) at its first end token and drop padding."""
    outputs = []
    for row in rows.tolist():
        tokens = []
        for token in row:
            if token == eos_id:
                break
            if token != pad_id:
                tokens.append(token)
        outputs.append(tokens)
    return outputs


def _forbid_specials(logits: torch.Tensor, config: Seq2SeqConfig) -> torch.Tensor:
    """Rule out padding and the begin token as generated tokens."""
    logits[:, config.pad_id] = float("-inf")
    logits[:, config.bos_id] = float("-inf")
    return logits


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, source_ids: torch.Tensor, max_len: int) -> list[list[int]]:
    """Translate a batch by taking the most likely token at every step.

    Parameters
    ----------
    model : Seq2SeqTransformer
        Put in eval mode by the caller when dropout should be off.
    source_ids : int64 tensor of shape (B, S)
        Right-padded source token ids.
    max_len : int
        Maximum generated tokens per sentence, counting the end token, at most the model's
        ``max_target_len``.

    Returns
    -------
    list of list of int
        Per sentence, the generated ids without the begin token, cut before the end token.
    """
    _check_max_len(model, max_len)
    config = model.config
    memory, key_mask = model.encode(source_ids)
    tokens = torch.full((source_ids.shape[0], 1), config.bos_id, dtype=torch.long, device=source_ids.device)
    finished = torch.zeros(source_ids.shape[0], dtype=torch.bool, device=source_ids.device)
    for _ in range(max_len):
        logits = _forbid_specials(model.decode(tokens, memory, key_mask)[:, -1], config)  # (B, V)
        next_token = logits.argmax(-1)
        next_token[finished] = config.pad_id
        tokens = torch.cat([tokens, next_token[:, None]], 1)
        finished |= next_token == config.eos_id
        if bool(finished.all()):
            break
    return _strip(tokens[:, 1:], config.eos_id, config.pad_id)


@torch.no_grad()
def beam_search(
    model: Seq2SeqTransformer,
    source_ids: torch.Tensor,
    max_len: int,
    beam_size: int = 4,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
) -> list[list[int]]:
    """Translate a batch with beam search and return the best hypothesis per sentence.

    Every sentence keeps ``beam_size`` hypotheses ranked by total log-probability. A finished
    hypothesis is carried on unchanged (extended with padding at no cost). At the end, each
    hypothesis's log-probability is divided by ``length ** length_penalty``, where length
    counts the generated tokens including the end token, and the best one is returned.
    With ``beam_size=1`` this is greedy decoding.

    Parameters
    ----------
    model, source_ids, max_len
        As in :func:`greedy_decode`.
    beam_size : int
        Hypotheses kept per sentence (>= 1).
    length_penalty : float
        Exponent of the length normalisation (>= 0).

    Returns
    -------
    list of list of int
        As in :func:`greedy_decode`.
    """
    _check_max_len(model, max_len)
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
    if not length_penalty >= 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty!r}")
    config = model.config
    batch, device = source_ids.shape[0], source_ids.device
    memory, key_mask = model.encode(source_ids)
    memory = memory.repeat_interleave(beam_size, 0)  # (B * K, S, d_model)
    key_mask = key_mask.repeat_interleave(beam_size, 0)

    tokens = torch.full((batch * beam_size, 1), config.bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal, so only the first one is expanded at step 0
    finished = torch.zeros(batch * beam_size, dtype=torch.bool, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * beam_size
    for _ in range(max_len):
        logits = _forbid_specials(model.decode(tokens, memory, key_mask)[:, -1].float(), config)
        log_probs = logits.log_softmax(-1)  # (B * K, V)
        log_probs[finished] = float("-inf")
        log_probs[finished, config.pad_id] = 0.0
        vocab = log_probs.shape[1]
        total = (scores.reshape(-1, 1) + log_probs).reshape(batch, beam_size * vocab)
        scores, flat_index = total.topk(beam_size, dim=1)  # (B, K)
        parents = (offsets + flat_index // vocab).reshape(-1)
        next_token = (flat_index % vocab).reshape(-1)
        tokens = torch.cat([tokens[parents], next_token[:, None]], 1)
        finished = finished[parents] | (next_token == config.eos_id)
        if bool(finished.all()):
            break

    generated = tokens[:, 1:]
    lengths = ((generated != config.pad_id).sum(1)).clamp(min=1).reshape(batch, beam_size)
    normalised = scores / lengths.to(scores.dtype) ** length_penalty
    best = offsets[:, 0] + normalised.argmax(1)
    return _strip(generated[best], config.eos_id, config.pad_id)
