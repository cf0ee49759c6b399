"""Training, decoding and BLEU/chrF scoring of encoder-decoder translation models.

Plain PyTorch: teacher-forced cross-entropy with AdamW, greedy or beam-search decoding, and
sacrebleu scores computed on detokenised strings, the decoded text compared with the raw
reference sentences, so that the scores do not depend on the model's tokenizer.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import sacrebleu
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from otfuse.models.seq2seq import Seq2SeqTransformer
from otfuse.models.seq2seq_decoding import beam_search, greedy_decode

logger = logging.getLogger(__name__)

BLEU = "bleu"
CHRF = "chrf"
LOSS = "loss"
NUM_SENTENCES = "num_sentences"
SECONDS = "seconds"

# Share of the optimizer steps that warm the learning rate up linearly from 0. The other
# steps decay it along a half cosine to 0.
WARMUP_FRACTION = 0.05


class Tokenizer(Protocol):
    """Tokenizer interface of training and scoring, for example ``ByteBPETokenizer``."""

    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of sentence pairs: right-padded sources (N, S) and targets (N, T).

    Every target row is ``[bos] + tokens + [eos]`` and then padding, so the decoder reads
    ``target_ids[:, :-1]`` and predicts ``target_ids[:, 1:]``.
    """

    source_ids: torch.Tensor
    target_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.source_ids)


def pair_fits(tokenizer: Tokenizer, source: str, target: str, max_tokens: int) -> bool:
    """Return whether both sentences have between 1 and ``max_tokens`` tokens."""
    return 0 < len(tokenizer.encode(source)) <= max_tokens and 0 < len(tokenizer.encode(target)) <= max_tokens


def encode_pairs(
    tokenizer: Tokenizer, sources: Sequence[str], targets: Sequence[str], max_tokens: int
) -> EncodedPairs:
    """Encode sentence pairs, raising ValueError if a sentence has more than ``max_tokens`` tokens.

    Filter the pairs with :func:`pair_fits` first. Sources are padded to ``max_tokens``
    positions and targets to ``max_tokens + 2`` (begin and end tokens added), so a model needs
    ``max_source_len >= max_tokens`` and ``max_target_len >= max_tokens + 1``.
    """
    if len(sources) != len(targets):
        raise ValueError(f"got {len(sources)} sources but {len(targets)} targets; pass one target per source")
    if len(sources) == 0:
        raise ValueError("no sentence pairs to encode; pass at least one")
    source_ids = torch.full((len(sources), max_tokens), tokenizer.pad_id, dtype=torch.long)
    target_ids = torch.full((len(sources), max_tokens + 2), tokenizer.pad_id, dtype=torch.long)
    for row, (source, target) in enumerate(zip(sources, targets)):
        source_tokens = tokenizer.encode(source)
        target_tokens = [tokenizer.bos_id, *tokenizer.encode(target), tokenizer.eos_id]
        if len(source_tokens) > max_tokens or len(target_tokens) > max_tokens + 2:
            raise ValueError(
                f"pair {row} has {len(source_tokens)} source and {len(target_tokens) - 2} target "
                f"tokens, more than max_tokens={max_tokens}; filter the pairs with pair_fits first"
            )
        source_ids[row, : len(source_tokens)] = torch.tensor(source_tokens)
        target_ids[row, : len(target_tokens)] = torch.tensor(target_tokens)
    return EncodedPairs(source_ids, target_ids)


def _trim(ids: torch.Tensor, pad_id: int, keep: int = 1) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row, keeping at least ``keep``."""
    used = (ids != pad_id).any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else keep
    return ids[:, : max(length, keep)]


def _batch_loss(model: Seq2SeqTransformer, source: torch.Tensor, target: torch.Tensor,
                label_smoothing: float) -> torch.Tensor:
    pad_id = model.config.pad_id
    source, target = _trim(source, pad_id), _trim(target, pad_id, keep=2)
    logits = model(source, target[:, :-1])  # (B, T - 1, V)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
        ignore_index=pad_id, label_smoothing=label_smoothing,
    )


def train_translation(
    model: Seq2SeqTransformer,
    data: EncodedPairs,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    label_smoothing: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Train ``model`` in place on teacher-forced cross-entropy with AdamW.

    The learning rate warms up linearly over the first ``WARMUP_FRACTION`` of the steps and
    then follows a half cosine to 0. Batches are drawn in an order seeded by ``seed``, and
    dropout draws from the global generator seeded with ``seed`` inside ``fork_rng``, so the
    caller's random state is untouched and CPU runs repeat exactly.

    Parameters
    ----------
    model : Seq2SeqTransformer
        Trained on its device. Its train/eval mode is restored afterwards.
    data : EncodedPairs
        Training pairs from :func:`encode_pairs`.
    epochs : int
        Passes over the data (>= 1).
    max_steps : int, optional
        Stop after this many optimizer steps even within an epoch, for short fine-tuning.
    batch_size : int
        Pairs per optimizer step.
    lr, weight_decay : float
        AdamW peak learning rate and decoupled weight decay.
    label_smoothing : float
        Label smoothing of the cross-entropy, in [0, 1).
    seed : int
        Seeds the batch order and dropout.
    progress : bool
        Show a tqdm progress bar over the steps.

    Returns
    -------
    dict of str to float
        ``"loss"``: mean training loss of the last epoch's batches, ``"steps"``: optimizer
        steps taken, ``"seconds"``: wall-clock training time.

    Raises
    ------
    ValueError
        On a non-positive setting.
    FloatingPointError
        If the loss becomes NaN or infinite.
    """
    _check_training_settings(epochs, max_steps, batch_size, lr, weight_decay, label_smoothing)
    device = next(model.parameters()).device
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps))
    order_generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    started = time.perf_counter()
    step, epoch_loss, epoch_pairs = 0, 0.0, 0
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model.train()
            while step < total_steps:
                epoch_loss, epoch_pairs = 0.0, 0
                order = torch.randperm(len(data), generator=order_generator)
                for start in range(0, len(data), batch_size):
                    if step >= total_steps:
                        break
                    batch = order[start:start + batch_size]
                    loss = _batch_loss(model, data.source_ids[batch].to(device),
                                       data.target_ids[batch].to(device), label_smoothing)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"training loss became {loss.item()} at step {step}; lower lr (now {lr})"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    epoch_loss += loss.item() * len(batch)
                    epoch_pairs += len(batch)
                    bar.update()
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - started
    mean_loss = epoch_loss / max(epoch_pairs, 1)
    logger.info("trained %d steps on %d pairs in %.1f s: loss %.4f", step, len(data), seconds, mean_loss)
    return {LOSS: mean_loss, "steps": step, SECONDS: seconds}


def _warmup_cosine(total_steps: int):
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _check_training_settings(epochs, max_steps, batch_size, lr, weight_decay, label_smoothing) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_steps is not None and (not isinstance(max_steps, numbers.Integral) or isinstance(max_steps, bool)
                                  or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(weight_decay, numbers.Real) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    if not (isinstance(label_smoothing, numbers.Real) and 0 <= label_smoothing < 1):
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")


@torch.no_grad()
def teacher_forced_loss(model: Seq2SeqTransformer, data: EncodedPairs, *, batch_size: int = 256) -> float:
    """Return the mean per-token cross-entropy (no label smoothing) of the targets, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(data), batch_size):
            source = data.source_ids[start:start + batch_size].to(device)
            target = data.target_ids[start:start + batch_size].to(device)
            count = int((target[:, 1:] != model.config.pad_id).sum())
            total += _batch_loss(model, source, target, 0.0).item() * count
            tokens += count
    finally:
        model.train(was_training)
    return total / tokens


@torch.no_grad()
def translate(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    source_ids: torch.Tensor,
    *,
    max_len: int,
    beam_size: int = 1,
    batch_size: int = 256,
) -> list[str]:
    """Decode source ids (N, S) in eval mode and return the detokenised translations.

    ``beam_size=1`` decodes greedily, larger values use beam search.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    try:
        for start in range(0, len(source_ids), batch_size):
            batch = _trim(source_ids[start:start + batch_size], model.config.pad_id).to(device)
            if beam_size == 1:
                outputs = greedy_decode(model, batch, max_len)
            else:
                outputs = beam_search(model, batch, max_len, beam_size=beam_size)
            texts.extend(tokenizer.decode(ids) for ids in outputs)
    finally:
        model.train(was_training)
    return texts


def score_translations(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Return corpus BLEU and chrF with sacrebleu 2.x defaults.

    BLEU uses the 13a tokenisation, and chrF character 6-grams with beta 2.
    Both arguments are detokenised strings: decoded model output and raw reference sentences.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses for {len(references)} references; pass one per reference"
        )
    for label, values in (("hypotheses", hypotheses), ("references", references)):
        if not all(isinstance(value, str) for value in values):
            raise TypeError(f"{label} must be strings; decode token ids with the tokenizer first")
    hypotheses, references = list(hypotheses), list(references)
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    return {BLEU: float(bleu.score), CHRF: float(chrf.score)}


def evaluate_translation(
    model: Seq2SeqTransformer,
    tokenizer: Tokenizer,
    data: EncodedPairs,
    references: Sequence[str],
    *,
    max_len: int,
    beam_size: int = 1,
) -> dict[str, float]:
    """Decode ``data``'s sources and score them against the raw ``references``.

    Returns ``"bleu"``, ``"chrf"``, the teacher-forced ``"loss"`` per target token,
    ``"num_sentences"`` and ``"seconds"``.
    """
    started = time.perf_counter()
    hypotheses = translate(model, tokenizer, data.source_ids, max_len=max_len, beam_size=beam_size)
    scores = score_translations(hypotheses, references)
    scores[LOSS] = teacher_forced_loss(model, data)
    scores[NUM_SENTENCES] = len(references)
    scores[SECONDS] = time.perf_counter() - started
    return scores
