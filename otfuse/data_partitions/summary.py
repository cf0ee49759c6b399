"""Tables that describe partitions and data sets: rows, label counts and tokens per text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from otfuse.data_partitions.labels import label_array
from otfuse.data_partitions.partitioning import ClientData
from otfuse.data_partitions.tokenizer import HashTokenizer

PARTITION = "partition"
TRAIN_ROWS = "train"
TEST_ROWS = "test"
LANGUAGES = "languages"
MEAN_TOKENS = "mean_tokens"


def label_counts(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Count the rows of each class; a multi-label row counts once for every class it has.

    Returns an int64 array of shape (len(classes),).
    """
    if frame.empty:
        return np.zeros(len(classes), dtype=np.int64)
    labels = label_array(frame)
    if labels.ndim == 2:
        return labels.sum(axis=0).astype(np.int64)
    return np.bincount(labels, minlength=len(classes)).astype(np.int64)


def partition_summary(
    clients: Sequence[ClientData], classes: Sequence[str], tokenizer: HashTokenizer | None = None
) -> pd.DataFrame:
    """Describe each node's partition in one row.

    Columns: ``partition``, ``train`` and ``test`` (row counts), ``languages`` (codes in
    the train part, comma-separated), one column per class with its count in the train
    part, and ``mean_tokens`` (words per train text, before truncation).
    """
    tokenizer = tokenizer or HashTokenizer()
    records = []
    for partition_id, client in enumerate(clients):
        train = client.train
        counts = label_counts(train, classes)
        tokens = tokenizer.token_counts(train["text"].tolist())
        records.append({
            PARTITION: partition_id,
            TRAIN_ROWS: len(train),
            TEST_ROWS: len(client.test),
            LANGUAGES: ",".join(sorted(train["language"].unique())) if "language" in train else "",
            **{name: int(count) for name, count in zip(classes, counts)},
            MEAN_TOKENS: float(tokens.mean()) if len(tokens) else float("nan"),
        })
    return pd.DataFrame.from_records(records)


def token_count_summary(frames: Mapping[str, pd.DataFrame], tokenizer: HashTokenizer | None = None) -> pd.DataFrame:
    """Count words per text in each named frame, before truncation to the tokenizer's ``max_len``.

    Returns one row per frame with ``texts``, ``mean``, ``median``, ``p95`` and
    ``truncated`` (the share of texts longer than ``max_len``).
    """
    tokenizer = tokenizer or HashTokenizer()
    records = []
    for name, frame in frames.items():
        counts = tokenizer.token_counts(frame["text"].tolist())
        records.append({
            "name": name,
            "texts": len(counts),
            "mean": float(counts.mean()),
            "median": float(np.median(counts)),
            "p95": float(np.percentile(counts, 95)),
            "truncated": float((counts > tokenizer.max_len).mean()),
        })
    return pd.DataFrame.from_records(records)
