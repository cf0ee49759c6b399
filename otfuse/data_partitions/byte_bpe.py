"""Byte-level BPE tokenizer for translation, trained once on text that no client holds.

Every string is first cut into pieces (a word or a run of punctuation, each with at most one
leading space, or a run of whitespace), and each piece into its UTF-8 bytes. Byte-pair
encoding then merges the most frequent adjacent pair of symbols, again and again, within
pieces only (Sennrich et al., 2016, with the byte alphabet of GPT-2). Because the 256 bytes
are always in the vocabulary, every string can be encoded, and decoding returns it exactly.

With no merges the tokenizer is a plain byte vocabulary that needs no data at all. Training
is deterministic: the same texts give the same merges whatever their order, because the
counts do not depend on the order and ties go to the pair with the smaller ids.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
BYTE_OFFSET = len(SPECIAL_TOKENS)
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256

FORMAT_NAME = "otfuse-byte-bpe"
FORMAT_VERSION = 1

# Every character is a word character, whitespace or neither, so the pieces cover the text.
_PIECE_PATTERN = re.compile(r" ?\w+| ?[^\w\s]+|\s+")

# A pair seen only once is not worth a vocabulary entry.
MIN_PAIR_COUNT = 2


class ByteBPETokenizer:
    """Byte-level BPE vocabulary: padding, begin and end tokens, 256 bytes, then the merges.

    Parameters
    ----------
    merges : sequence of (int, int)
        Merge ``k`` joins the two ids and gets id ``BYTE_VOCAB_SIZE + k``. Each id must exist
        before the merge that uses it.
    """

    def __init__(self, merges: Sequence[tuple[int, int]] = ()) -> None:
        self.merges: list[tuple[int, int]] = []
        for index, pair in enumerate(merges):
            first, second = (int(x) for x in pair)
            if not (0 <= first < BYTE_VOCAB_SIZE + index and 0 <= second < BYTE_VOCAB_SIZE + index) or min(
                first, second
            ) < BYTE_OFFSET:
                raise ValueError(
                    f"merge {index} joins ids ({first}, {second}), but only byte ids and earlier "
                    f"merges ([{BYTE_OFFSET}, {BYTE_VOCAB_SIZE + index})) can be joined; the merge "
                    "list is corrupt"
                )
            self.merges.append((first, second))
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._bytes: list[bytes] = [b""] * BYTE_OFFSET + [bytes([value]) for value in range(256)]
        for first, second in self.merges:
            self._bytes.append(self._bytes[first] + self._bytes[second])
        self._cache: dict[str, list[int]] = {}

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE + len(self.merges)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> ByteBPETokenizer:
        """Learn merges from ``texts`` until the vocabulary has ``vocab_size`` entries.

        Training stops earlier when no adjacent pair occurs at least ``MIN_PAIR_COUNT``
        times. ``vocab_size`` counts the 3 special tokens and the 256 bytes, so 259 means no
        merges.
        """
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be an integer >= {BYTE_VOCAB_SIZE} (3 special tokens and 256 "
                f"bytes), got {vocab_size!r}"
            )
        piece_counts = Counter(piece for text in texts for piece in _pieces(text))
        words = [[BYTE_OFFSET + b for b in piece.encode("utf-8")] for piece in piece_counts]
        frequencies = list(piece_counts.values())
        merges = _learn_merges(words, frequencies, vocab_size - BYTE_VOCAB_SIZE)
        if len(merges) < vocab_size - BYTE_VOCAB_SIZE:
            logger.info(
                "byte BPE stopped at %d merges (vocabulary %d of the %d requested): no pair occurs "
                "%d times or more; train on more text for a larger vocabulary",
                len(merges), BYTE_VOCAB_SIZE + len(merges), vocab_size, MIN_PAIR_COUNT,
            )
        return cls(merges)

    def encode(self, text: str) -> list[int]:
        """Return the token ids of ``text``, without begin or end tokens."""
        ids: list[int] = []
        for piece in _pieces(text):
            cached = self._cache.get(piece)
            if cached is None:
                cached = self._encode_piece(piece)
                self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids``, skipping special tokens and replacing invalid UTF-8."""
        data = b"".join(self._bytes[i] for i in ids if BYTE_OFFSET <= i < len(self._bytes))
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """Return a short SHA-256 digest of the merges: equal digests mean equal tokenizers."""
        return hashlib.sha256(json.dumps(self.merges).encode("ascii")).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the merges as JSON, so that every client loads the same tokenizer."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "merges": self.merges}
        path.write_text(json.dumps(payload), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ByteBPETokenizer:
        """Read a tokenizer written by :meth:`save`."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read tokenizer file {str(path)!r}: {error}") from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise ValueError(f"tokenizer file {str(path)!r} is not an {FORMAT_NAME} file; write it with save()")
        if payload.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"tokenizer file {str(path)!r} has format version {payload.get('version')!r}; "
                f"this code reads version {FORMAT_VERSION}"
            )
        return cls([tuple(pair) for pair in payload["merges"]])

    def _encode_piece(self, piece: str) -> list[int]:
        symbols = [BYTE_OFFSET + b for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            ranked = [(self._ranks.get(pair, len(self._ranks)), pair) for pair in zip(symbols, symbols[1:])]
            rank, pair = min(ranked)
            if rank == len(self._ranks):
                break
            symbols = _merge(symbols, pair, BYTE_VOCAB_SIZE + rank)
        return symbols


def _pieces(text: str) -> list[str]:
    if not isinstance(text, str):
        raise TypeError(f"expected a str to tokenize, got {type(text).__name__}")
    return _PIECE_PATTERN.findall(text)


def _merge(symbols: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair``, from the left, by ``new_id``."""
    merged, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(new_id)
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def _learn_merges(words: list[list[int]], frequencies: list[int], count: int) -> list[tuple[int, int]]:
    """Learn up to ``count`` merges, updating the pair counts only in the words a merge touches.

    A heap contains (-count, pair) entries. An entry whose count changed after it was pushed is
    skipped when popped, and every changed pair is pushed again with its new count.
    """
    pair_counts: Counter[tuple[int, int]] = Counter()
    pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += frequencies[index]
            pair_words[pair].add(index)
    heap = [(-total, pair) for pair, total in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < count and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:
            continue  # stale entry
        if -negative < MIN_PAIR_COUNT:
            break
        new_id = BYTE_VOCAB_SIZE + len(merges)
        merges.append(pair)
        changed: set[tuple[int, int]] = set()
        for index in pair_words.pop(pair):
            word, frequency = words[index], frequencies[index]
            for old in zip(word, word[1:]):
                pair_counts[old] -= frequency
                changed.add(old)
            word = _merge(word, pair, new_id)
            for new in zip(word, word[1:]):
                pair_counts[new] += frequency
                pair_words[new].add(index)
                changed.add(new)
            words[index] = word
        for changed_pair in changed:
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
    return merges
