"""Data sets as uniform frames, read from local Parquet files or the Hugging Face Hub.

Every loader returns the columns ``text`` (str), ``label``, ``dataset`` (the data set's
name) and ``language`` (an ISO 639-1 code), whatever the source schema is. For the binary
sentiment data sets, ``label`` is int64 with 0 = negative and 1 = positive. For XED, see
:mod:`otfuse.data_partitions.xed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.labels import EMOTION_LABELS, SENTIMENT_LABELS, SINGLE_LABEL, check_task
from otfuse.data_partitions.readers import DATA_DIR_ENV, read_hub_split, read_parquet_columns
from otfuse.data_partitions.xed import XED_LANGUAGES, load_xed

logger = logging.getLogger(__name__)

#: The binary sentiment data sets, which a run uses unless it names others.
DATASET_NAMES: tuple[str, ...] = ("sst2", "imdb", "sentiment140")
#: XED emotion sentences, one data set per language.
XED_DATASETS: tuple[str, ...] = tuple(XED_LANGUAGES)
#: Every data set that :func:`load_split` can load.
ALL_DATASETS: tuple[str, ...] = DATASET_NAMES + XED_DATASETS

#: The split each data set is scored on. SST-2's test labels are hidden, so its
#: validation split serves as the test set. XED has no test split, so its held-out
#: part is made by :mod:`otfuse.data_partitions.xed`.
EVAL_SPLIT: dict[str, str] = {
    "sst2": "validation",
    "imdb": "test",
    "sentiment140": "test",
    **{name: "test" for name in XED_DATASETS},
}

#: Language of each data set's text.
DATASET_LANGUAGES: dict[str, str] = {
    **{name: "en" for name in DATASET_NAMES},
    **XED_LANGUAGES,
}

TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
DATASET_COLUMN = "dataset"
LANGUAGE_COLUMN = "language"
COLUMNS = (TEXT_COLUMN, LABEL_COLUMN, DATASET_COLUMN, LANGUAGE_COLUMN)

# Folders of the local copy: both XED data sets read the one file in xed/.
_FOLDERS = (*DATASET_NAMES, "xed")

#: The label value the Hub uses for unlabelled rows (SST-2 test, IMDB unsupervised).
UNLABELLED = -1


@dataclass(frozen=True)
class _Source:
    """Hub location, splits and column mapping of one data set."""

    hub_path: str
    hub_config: str | None
    splits: tuple[str, ...]
    text_column: str
    label_column: str
    label_map: Mapping[int, int]
    dropped_labels: Mapping[int, str] = field(default_factory=dict)


_SOURCES: dict[str, _Source] = {
    "sst2": _Source(
        hub_path="nyu-mll/glue",
        hub_config="sst2",
        splits=("train", "validation", "test"),
        text_column="sentence",
        label_column="label",
        label_map={0: 0, 1: 1},
    ),
    "imdb": _Source(
        hub_path="stanfordnlp/imdb",
        hub_config=None,
        splits=("train", "test", "unsupervised"),
        text_column="text",
        label_column="label",
        label_map={0: 0, 1: 1},
    ),
    # Sentiment140 stores the original polarity 0 / 2 / 4; neutral (2) occurs only in test.
    "sentiment140": _Source(
        hub_path="stanfordnlp/sentiment140",
        hub_config=None,
        splits=("train", "test"),
        text_column="text",
        label_column="sentiment",
        label_map={0: 0, 4: 1},
        dropped_labels={2: "neutral"},
    ),
}


def label_names(name: str) -> tuple[str, ...]:
    """Return the class names of a data set, in label-id order."""
    if name in XED_DATASETS:
        return EMOTION_LABELS
    _source(name)
    return SENTIMENT_LABELS


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """Choose the folder that contains the local data sets.

    Parameters
    ----------
    data_dir : str, os.PathLike or None
        An explicit folder. It takes precedence over the environment.

    Returns
    -------
    pathlib.Path or None
        ``data_dir`` if given, else the folder in the ``OTFUSE_DATA_DIR`` environment
        variable, else None, which means that data sets are loaded from the Hugging Face
        Hub by name.

    Raises
    ------
    DataError
        If the chosen folder does not exist.
    """
    if data_dir is not None:
        origin = "data_dir argument"
    else:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        origin = f"{DATA_DIR_ENV} environment variable"
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data folder {str(path)!r} (from the {origin}) does not exist or is not a folder; "
            f"point it at the folder that contains {', '.join(_FOLDERS)}, or unset it to "
            "load the data sets from the Hugging Face Hub"
        )
    return path


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    task: str = SINGLE_LABEL,
) -> pd.DataFrame:
    """Load one split of a data set as a uniform frame.

    Parameters
    ----------
    name : str
        One of :data:`ALL_DATASETS`.
    split : str
        A split of that data set, for example ``"train"``. :data:`EVAL_SPLIT` names the
        split to score on.
    data_dir : str, os.PathLike or None
        Folder with ``<name>/<split>.parquet`` files (``xed/train.parquet`` for both XED
        data sets), resolved by :func:`resolve_data_dir`. When it resolves to None, the
        split is downloaded from the Hugging Face Hub.
    task : str
        ``"single-label"`` or, for XED only, ``"multi-label"``; see
        :func:`otfuse.data_partitions.xed.load_xed`.

    Returns
    -------
    pandas.DataFrame
        Columns ``text`` (str), ``label``, ``dataset`` (``name``) and ``language``, with a
        fresh 0-based index. Sentiment labels are int64, 0 = negative and 1 = positive;
        Sentiment140's neutral rows are dropped, and their count is logged at INFO.

    Raises
    ------
    DataError
        If the name, split or task is unknown, the file or a column is missing, the split
        is unlabelled, or a label value has no mapping.
    """
    check_task(task)
    if name in XED_DATASETS:
        return load_xed(name, split, task, resolve_data_dir(data_dir))
    source = _source(name)
    if task != SINGLE_LABEL:
        raise DataError(
            f"data set {name!r} has one sentiment label per text, so it supports only task "
            f"'single-label', got {task!r}; use an XED data set for 'multi-label'"
        )
    if split not in source.splits:
        raise DataError(
            f"unknown split {split!r} of data set {name!r}; choose one of {list(source.splits)}"
        )
    columns = (source.text_column, source.label_column)
    root = resolve_data_dir(data_dir)
    if root is None:
        raw = read_hub_split(source.hub_path, source.hub_config, split, columns)
    else:
        raw = read_parquet_columns(root / name / f"{split}.parquet", columns)
    return _to_binary_frame(raw, name, split, source)


def _source(name: str) -> _Source:
    if name not in _SOURCES:
        raise DataError(f"unknown data set {name!r}; choose one of {list(ALL_DATASETS)}")
    return _SOURCES[name]


def _to_binary_frame(raw: pd.DataFrame, name: str, split: str, source: _Source) -> pd.DataFrame:
    text = raw[source.text_column]
    labels = raw[source.label_column]
    if text.isna().any() or labels.isna().any():
        column = source.text_column if text.isna().any() else source.label_column
        raise DataError(
            f"{name} split {split!r} has {int(raw[column].isna().sum())} missing values in "
            f"column {column!r}; repair the file or drop those rows"
        )
    labels = labels.astype(np.int64)

    if len(labels) and (labels == UNLABELLED).all():
        suggestion = EVAL_SPLIT[name] if split != EVAL_SPLIT[name] else "train"
        raise DataError(
            f"{name} split {split!r} is unlabelled (every label is {UNLABELLED}); "
            f"use split {suggestion!r} for training or evaluation"
        )

    keep = ~labels.isin(list(source.dropped_labels))
    for value, meaning in source.dropped_labels.items():
        count = int((labels == value).sum())
        if count:
            logger.info("%s split %r: dropped %d %s rows (label %d)", name, split, count, meaning, value)

    unknown = sorted(set(labels[keep].unique().tolist()) - set(source.label_map))
    if unknown:
        raise DataError(
            f"{name} split {split!r} has label values {unknown} in column "
            f"{source.label_column!r}, expected only {sorted(source.label_map)}; "
            "check that the file belongs to this data set"
        )

    frame = pd.DataFrame(
        {
            TEXT_COLUMN: text[keep].astype(str).to_numpy(),
            LABEL_COLUMN: labels[keep].map(source.label_map).astype(np.int64).to_numpy(),
            DATASET_COLUMN: name,
            LANGUAGE_COLUMN: DATASET_LANGUAGES[name],
        }
    )
    logger.debug("%s split %r: %d rows", name, split, len(frame))
    return frame
