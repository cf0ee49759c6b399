"""The WordPiece tokenizer of a pretrained BERT checkpoint, with the interface of ``HashTokenizer``."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from otfuse.models.bert import resolve_checkpoint_dir

# IMDB reviews keep the HTML line breaks of the original site ("<br />"); WordPiece would
# spend four tokens on each.
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TOKENIZER_CACHE_SIZE = 2


@dataclass(frozen=True)
class WordPieceTokenizer:
    """Encode texts with a checkpoint's own tokenizer into fixed-length id arrays.

    Each row is ``[CLS] tokens [SEP]``, truncated to ``max_len`` tokens and padded with the
    tokenizer's pad id. The tokenizer files (``tokenizer.json`` or ``vocab.txt``) are read
    from the checkpoint folder only, never from a hub.

    Parameters
    ----------
    source : str
        ``"minilm"`` or an absolute path to a checkpoint folder, as in
        :class:`otfuse.models.bert.BertClassifierConfig`.
    max_len : int
        Tokens per text, including ``[CLS]`` and ``[SEP]``.
    """

    source: str
    max_len: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 2:
            raise ValueError(
                f"WordPieceTokenizer max_len must be an integer of at least 2 (room for [CLS] "
                f"and [SEP]), got {self.max_len!r}"
            )

    @property
    def pad_id(self) -> int:
        return int(_load_tokenizer(self.source).pad_token_id)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return int64 token ids of shape (len(texts), max_len)."""
        if isinstance(texts, (str, bytes)):
            raise TypeError(
                "WordPieceTokenizer.encode expects a sequence of strings, got a single string; "
                "wrap it in a list"
            )
        cleaned = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"WordPieceTokenizer.encode expects strings, got {type(text).__name__} "
                    f"{text!r} at position {row}; drop or fill missing texts first"
                )
            cleaned.append(_HTML_BREAK.sub(" ", text))
        if not cleaned:
            return np.zeros((0, self.max_len), dtype=np.int64)
        encoded = _load_tokenizer(self.source)(
            cleaned,
            max_length=self.max_len,
            truncation=True,
            padding="max_length",
            return_attention_mask=False,
            return_token_type_ids=False,
            return_tensors="np",
        )
        return encoded["input_ids"].astype(np.int64)


@functools.lru_cache(maxsize=_TOKENIZER_CACHE_SIZE)
def _load_tokenizer(source: str):
    from transformers import BertTokenizerFast

    folder = resolve_checkpoint_dir(source)
    try:
        return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot read a WordPiece tokenizer from {str(folder)!r} ({error}); the folder needs "
            "tokenizer.json or vocab.txt"
        ) from error
