"""XED emotion sentences in English and Finnish, deduplicated, with a fixed held-out split.

XED (Öhman, Pàmies, Kajava and Tiedemann, COLING 2020) annotates movie-subtitle sentences
with Plutchik's eight emotions (ids 0-7, several per sentence). It keeps neutral sentences
in separate files, labelled 8 in the local Parquet copy and with a one-class ``neutral``
label on the Hub. It has no test split, so this module makes one:

1. Surrounding whitespace is stripped and each (language, sentence) pair is kept once. A
   repeated sentence gets the union of the emotions of its copies. Neutral counts only when
   no copy has an emotion: 1,789 Finnish sentences occur in both the neutral and the
   annotated file, and the emotion annotation is the more specific one.
2. Every sentence falls into one stratum: neutral, one of the eight emotions, or several
   emotions. Within each (language, stratum), sentences are ordered by a salted SHA-256 of
   their text, and the first :data:`TEST_FRACTION` of them are held out. The split depends
   on the text alone, so it is the same in every run, on every machine and for every seed.
3. 91 strings, mostly names and interjections, occur in both languages. Such a string is
   held out only when both languages hold it out, so no string is in the training part of
   one language and the test part of the other.

Both tasks read the same split. The single-label task keeps the sentences with exactly one
emotion. The multi-label task keeps the sentences with at least one emotion. Neither keeps
neutral sentences, so both have the same eight classes (see ``docs/data.md`` for why).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.labels import EMOTION_LABELS, MULTI_LABEL, SINGLE_LABEL
from otfuse.data_partitions.readers import raise_missing_file, read_hub_split, read_parquet_columns

logger = logging.getLogger(__name__)

#: Data set name to language code.
XED_LANGUAGES: dict[str, str] = {"xed-en": "en", "xed-fi": "fi"}
XED_SPLITS: tuple[str, ...] = ("train", "test")
XED_FOLDER = "xed"
#: The local copy stores all four Hub configs in this one file, and its ``config`` column names them.
XED_FILE = "train.parquet"
XED_HUB_PATH = "Helsinki-NLP/xed_en_fi"
RAW_COLUMNS = ("sentence", "labels", "language")

NEUTRAL_ID = 8
NUM_EMOTIONS = len(EMOTION_LABELS)

#: Share of each (language, stratum) that is held out for testing.
TEST_FRACTION = 0.2
#: Salt of the hash that orders sentences for the split. Changing it changes the split.
SPLIT_SALT = "otfuse-xed-split-v1"
_HASH_BYTES = 8

NEUTRAL_STRATUM = "neutral"
MULTIPLE_STRATUM = "multiple"


def load_xed(name: str, split: str, task: str, root: Path | None) -> pd.DataFrame:
    """Load one split of ``xed-en`` or ``xed-fi`` for one task.

    Parameters
    ----------
    name : str
        ``"xed-en"`` or ``"xed-fi"``.
    split : str
        ``"train"`` or ``"test"``.
    task : str
        ``"single-label"``: sentences with exactly one emotion, label an int64 emotion id.
        ``"multi-label"``: sentences with at least one emotion, label a tuple of eight 0/1 ints.
    root : pathlib.Path or None
        Data folder with ``xed/train.parquet``; None loads the four Hub configs.

    Returns
    -------
    pandas.DataFrame
        Columns ``text``, ``label``, ``dataset`` and ``language``, in source order of first
        occurrence.
    """
    if split not in XED_SPLITS:
        raise DataError(f"unknown split {split!r} of data set {name!r}; choose one of {list(XED_SPLITS)}")
    sentences = xed_sentences(root)
    chosen = sentences[(sentences["language"] == XED_LANGUAGES[name]) & (sentences["split"] == split)]
    counts = chosen["emotions"].map(len)
    if task == SINGLE_LABEL:
        chosen = chosen[counts == 1]
        labels = chosen["emotions"].map(lambda emotions: emotions[0]).astype(np.int64)
    elif task == MULTI_LABEL:
        chosen = chosen[counts >= 1]
        labels = chosen["emotions"].map(_multi_hot)
    else:
        raise DataError(f"unknown task {task!r}; choose 'single-label' or 'multi-label'")
    frame = pd.DataFrame(
        {
            "text": chosen["text"].to_numpy(),
            "label": labels.to_numpy(),
            "dataset": name,
            "language": XED_LANGUAGES[name],
        }
    )
    logger.debug("%s split %r (%s): %d rows", name, split, task, len(frame))
    return frame


def xed_sentences(root: Path | None) -> pd.DataFrame:
    """Return every deduplicated XED sentence of both languages with its emotions and split.

    Columns: ``language``, ``text``, ``emotions`` (sorted tuple of emotion ids, empty for
    neutral), ``stratum`` and ``split`` (``"train"`` or ``"test"``). The result is cached
    per file, keyed by its path, size and modification time, and returned as a copy.
    """
    if root is None:
        return _hub_sentences().copy()
    path = root / XED_FOLDER / XED_FILE
    if not path.is_file():
        raise_missing_file(path)
    stat = path.stat()
    return _local_sentences(str(path), stat.st_size, stat.st_mtime_ns).copy()


@functools.lru_cache(maxsize=2)
def _local_sentences(path: str, size: int, mtime_ns: int) -> pd.DataFrame:
    del size, mtime_ns  # only part of the cache key
    return _split_sentences(_deduplicate(_read_local(Path(path))))


@functools.lru_cache(maxsize=1)
def _hub_sentences() -> pd.DataFrame:
    return _split_sentences(_deduplicate(_read_hub()))


def _read_local(path: Path) -> pd.DataFrame:
    return read_parquet_columns(path, RAW_COLUMNS)


def _read_hub() -> pd.DataFrame:
    # NOTE: tested only with a stubbed load_dataset. The Hub repository has a loading script,
    # which datasets 4 no longer runs, so this path may fail until it carries Parquet files.
    parts = []
    for language in XED_LANGUAGES.values():
        for kind in ("annotated", "neutral"):
            frame = read_hub_split(XED_HUB_PATH, f"{language}_{kind}", "train", ("sentence", "labels"))
            if kind == "neutral":
                # The Hub's neutral configs label every row with class 0 of a one-class label.
                frame = frame.assign(labels=[[NEUTRAL_ID]] * len(frame))
            parts.append(frame.assign(language=language))
    return pd.concat(parts, ignore_index=True)


def _deduplicate(raw: pd.DataFrame) -> pd.DataFrame:
    """Keep each (language, stripped sentence) once, with the union of its emotions."""
    _check_raw(raw)
    raw = raw.assign(text=raw["sentence"].astype(str).str.strip())
    exploded = raw[["language", "text", "labels"]].explode("labels")
    emotions = exploded[exploded["labels"] != NEUTRAL_ID]
    emotion_sets = emotions.groupby(["language", "text"], sort=False)["labels"].agg(
        lambda ids: tuple(sorted({int(i) for i in ids}))
    )
    unique = raw.drop_duplicates(["language", "text"])[["language", "text"]].reset_index(drop=True)
    keys = pd.MultiIndex.from_frame(unique)
    found = emotion_sets.reindex(keys)
    unique["emotions"] = [value if isinstance(value, tuple) else () for value in found]
    logger.debug("XED: %d rows, %d distinct (language, sentence) pairs", len(raw), len(unique))
    return unique


def _check_raw(raw: pd.DataFrame) -> None:
    if raw["sentence"].isna().any():
        raise DataError(
            f"XED has {int(raw['sentence'].isna().sum())} missing sentences; repair the file"
        )
    languages = set(raw["language"].unique()) - set(XED_LANGUAGES.values())
    if languages:
        raise DataError(
            f"XED has rows in unknown languages {sorted(languages)}; expected only "
            f"{sorted(XED_LANGUAGES.values())}, so check that the file is the XED copy"
        )
    empty = int(raw["labels"].map(len).eq(0).sum())
    if empty:
        raise DataError(f"XED has {empty} rows without a label; repair the file or drop them")
    ids = {int(i) for labels in raw["labels"] for i in labels}
    unknown = sorted(ids - set(range(NUM_EMOTIONS + 1)))
    if unknown:
        raise DataError(
            f"XED has label ids {unknown}; expected 0-{NUM_EMOTIONS - 1} for emotions and "
            f"{NEUTRAL_ID} for neutral, so check that the file uses the documented encoding"
        )


def _split_sentences(sentences: pd.DataFrame) -> pd.DataFrame:
    """Add the ``stratum`` and ``split`` columns (see the module docstring)."""
    sentences = sentences.copy()
    sentences["stratum"] = sentences["emotions"].map(_stratum)
    sentences["hash"] = sentences["text"].map(_split_hash)
    held_out = np.zeros(len(sentences), dtype=bool)
    for _, group in sentences.groupby(["language", "stratum"], sort=False):
        ordered = group.sort_values(["hash", "text"]).index.to_numpy()
        num_test = int(np.floor(TEST_FRACTION * len(ordered) + 0.5))
        held_out[ordered[:num_test]] = True

    # A string that occurs in several languages is held out only where all of them hold it out.
    held_out_everywhere = pd.Series(held_out).groupby(sentences["text"]).transform("all").to_numpy()
    moved = int((held_out & ~held_out_everywhere).sum())
    if moved:
        logger.debug("XED: %d held-out sentences moved to train, as their text is in train in another language", moved)
    sentences["split"] = np.where(held_out_everywhere, "test", "train")
    return sentences.drop(columns="hash")


def _stratum(emotions: tuple[int, ...]) -> str:
    if not emotions:
        return NEUTRAL_STRATUM
    if len(emotions) == 1:
        return EMOTION_LABELS[emotions[0]]
    return MULTIPLE_STRATUM


def _split_hash(text: str) -> int:
    digest = hashlib.sha256(f"{SPLIT_SALT}|{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:_HASH_BYTES], "big")


def _multi_hot(emotions: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i in emotions) for i in range(NUM_EMOTIONS))
