"""Sentiment data sets as uniform frames, read from local Parquet files or the Hugging Face Hub.

Every loader returns the columns ``text`` (str), ``label`` (int64, 0 = negative,
1 = positive) and ``dataset`` (the data set's name), whatever the source schema is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from otfuse.data_partitions.errors import DataError

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("sst2", "imdb", "sentiment140")
DATA_DIR_ENV = "OTFUSE_DATA_DIR"

#: The split each data set is scored on. SST-2's test labels are hidden, so its
#: validation split serves as the test set.
EVAL_SPLIT: dict[str, str] = {"sst2": "validation", "imdb": "test", "sentiment140": "test"}

TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
DATASET_COLUMN = "dataset"
COLUMNS = (TEXT_COLUMN, LABEL_COLUMN, DATASET_COLUMN)

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
            f"point it at the folder that contains {', '.join(DATASET_NAMES)}, or unset it to "
            "load the data sets from the Hugging Face Hub"
        )
    return path


def load_split(name: str, split: str, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Load one split of a data set with binary sentiment labels.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.
    split : str
        A split of that data set, for example ``"train"``. :data:`EVAL_SPLIT` names the
        split to score on.
    data_dir : str, os.PathLike or None
        Folder with ``<name>/<split>.parquet`` files, resolved by :func:`resolve_data_dir`.
        When it resolves to None, the split is downloaded from the Hugging Face Hub.

    Returns
    -------
    pandas.DataFrame
        Columns ``text`` (str), ``label`` (int64, 0 = negative, 1 = positive) and
        ``dataset`` (``name``), with a fresh 0-based index. Sentiment140's neutral rows
        are dropped, and their count is logged at INFO.

    Raises
    ------
    DataError
        If the name or split is unknown, the file or a column is missing, the split is
        unlabelled, or a label value has no sentiment mapping.
    """
    source = _source(name)
    if split not in source.splits:
        raise DataError(
            f"unknown split {split!r} of data set {name!r}; choose one of {list(source.splits)}"
        )
    root = resolve_data_dir(data_dir)
    if root is None:
        raw = _read_hub(name, source, split)
    else:
        raw = _read_parquet(root / name / f"{split}.parquet", source)
    return _to_binary_frame(raw, name, split, source)


def _source(name: str) -> _Source:
    if name not in _SOURCES:
        raise DataError(f"unknown data set {name!r}; choose one of {list(DATASET_NAMES)}")
    return _SOURCES[name]


def _read_parquet(path: Path, source: _Source) -> pd.DataFrame:
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.parquet")) if path.parent.is_dir() else []
        raise DataError(
            f"data file {str(path)!r} not found (files in that folder: {present or 'none'}); "
            f"check the data folder and the split name, or unset {DATA_DIR_ENV} to use the Hub"
        )
    needed = [source.text_column, source.label_column]
    schema_names = pq.read_schema(path).names
    missing = [column for column in needed if column not in schema_names]
    if missing:
        raise DataError(
            f"data file {str(path)!r} has no column {missing[0]!r} (columns: {schema_names}); "
            "the file must follow the Hugging Face Hub schema of this data set"
        )
    logger.debug("reading %s", path)
    return pd.read_parquet(path, columns=needed)


def _read_hub(name: str, source: _Source, split: str) -> pd.DataFrame:
    # Imported here because the library is large and only the Hub path needs it.
    import datasets

    logger.info("loading %s split %r from the Hugging Face Hub (%s)", name, split, source.hub_path)
    try:
        dataset = datasets.load_dataset(source.hub_path, source.hub_config, split=split)
    except (OSError, ValueError) as error:
        raise DataError(
            f"could not load split {split!r} of {source.hub_path!r} from the Hugging Face Hub "
            f"({error}); pass data_dir or set {DATA_DIR_ENV} to a folder of local Parquet files"
        ) from error
    frame = dataset.to_pandas()
    missing = [c for c in (source.text_column, source.label_column) if c not in frame.columns]
    if missing:
        raise DataError(
            f"Hub data set {source.hub_path!r} split {split!r} has no column {missing[0]!r} "
            f"(columns: {list(frame.columns)}); its schema changed, so update the loader's mapping"
        )
    return frame


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
        }
    )
    logger.debug("%s split %r: %d rows", name, split, len(frame))
    return frame
