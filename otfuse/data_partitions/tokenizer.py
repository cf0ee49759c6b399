"""A vocabulary-free word tokenizer that hashes lower-case words into a fixed number of ids."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD_ID = 0

# Runs of Unicode letters, digits and underscores, so Finnish "hyvää" or German "Grüße" stay
# one word. Punctuation is dropped.
_WORD = re.compile(r"\w+")
# IMDB reviews keep the HTML line breaks of the original site ("<br />").
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)

_HASH_BYTES = 8
_BUCKET_CACHE_SIZE = 1 << 16


@functools.lru_cache(maxsize=_BUCKET_CACHE_SIZE)
def _bucket(word: str, num_buckets: int) -> int:
    # blake2b, unlike the built-in hash(), is not salted per process, so ids agree across
    # processes and machines.
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=_HASH_BYTES).digest()
    return 1 + int.from_bytes(digest, "little") % num_buckets


@dataclass(frozen=True)
class HashTokenizer:
    """Lower-case word tokenizer with hashed ids, identical on every node without a vocabulary.

    Each word maps to ``1 + blake2b(word) % (vocab_size - 1)``, so ids lie in
    ``[1, vocab_size)`` and id 0 stays free for padding. Distinct words may share an id.

    Parameters
    ----------
    vocab_size : int
        Number of ids including the padding id 0; must match the model's ``vocab_size``.
    max_len : int
        Tokens per sequence; longer texts are truncated and shorter ones padded with 0.
    """

    vocab_size: int = 16384
    max_len: int = 64

    def __post_init__(self) -> None:
        for name, minimum in (("vocab_size", 2), ("max_len", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(
                    f"HashTokenizer {name} must be an integer of at least {minimum}, got {value!r}"
                )

    def words(self, text: str) -> list[str]:
        """Return every lower-case word of ``text``, without truncating to ``max_len``."""
        return _WORD.findall(_HTML_BREAK.sub(" ", text).lower())

    def token_counts(self, texts: Sequence[str]) -> np.ndarray:
        """Count the words of each text before truncation to ``max_len``, as an int64 array of shape (N,)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("HashTokenizer.token_counts expects a sequence of strings; wrap a single text in a list")
        return np.array([len(self.words(text)) for text in texts], dtype=np.int64)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts as token ids.

        Parameters
        ----------
        texts : sequence of str
            The texts, for example a list or a pandas Series of strings.

        Returns
        -------
        numpy.ndarray
            int64 array of shape (len(texts), max_len), padded with 0 at the end.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError(
                "HashTokenizer.encode expects a sequence of strings, got a single string; "
                "wrap it in a list"
            )
        ids = np.full((len(texts), self.max_len), PAD_ID, dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"HashTokenizer.encode expects strings, got {type(text).__name__} "
                    f"{text!r} at position {row}; drop or fill missing texts first"
                )
            for column, word in enumerate(self._leading_words(text)):
                ids[row, column] = _bucket(word, self.vocab_size - 1)
        return ids

    def _leading_words(self, text: str) -> list[str]:
        # Reading only the first max_len words keeps long IMDB reviews cheap to encode.
        cleaned = _HTML_BREAK.sub(" ", text).lower()
        words = []
        for match in _WORD.finditer(cleaned):
            words.append(match.group())
            if len(words) == self.max_len:
                break
        return words
