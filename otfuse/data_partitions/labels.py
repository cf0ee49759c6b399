"""Label tasks, label names per data set, and conversion of a frame's labels to an array.

A frame's ``label`` column contains an int64 class index for the single-label task and a
tuple of 0/1 ints, one per class, for the multi-label task. Tuples, unlike arrays, are
hashable, so frames with multi-hot labels still work with ``drop_duplicates`` and
``Counter``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from otfuse.data_partitions.errors import DataError

SINGLE_LABEL = "single-label"
MULTI_LABEL = "multi-label"
TASKS: tuple[str, ...] = (SINGLE_LABEL, MULTI_LABEL)

SENTIMENT_LABELS: tuple[str, ...] = ("negative", "positive")
#: Plutchik's eight basic emotions in XED's id order (alphabetical, ids 0-7).
EMOTION_LABELS: tuple[str, ...] = (
    "anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust",
)


def check_task(task: str) -> str:
    """Return ``task`` if it is one of :data:`TASKS`, else raise DataError."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return task


def label_array(frame: pd.DataFrame) -> np.ndarray:
    """Convert a frame's ``label`` column to the array that training and evaluation take.

    Returns
    -------
    numpy.ndarray
        int64 class indices of shape (N,) for single-label frames, or float32 multi-hot
        targets of shape (N, C) for multi-label frames, whose labels are tuples.

    Raises
    ------
    DataError
        If the frame has no ``label`` column or its multi-hot tuples differ in length.
    """
    if "label" not in frame.columns:
        raise DataError(
            f"frame has no 'label' column (columns: {list(frame.columns)}); load it with load_split"
        )
    labels = frame["label"]
    if len(labels) == 0 or not isinstance(labels.iloc[0], tuple):
        return labels.to_numpy(dtype=np.int64)
    lengths = set(labels.map(len))
    if len(lengths) != 1:
        raise DataError(
            f"multi-hot labels have different lengths {sorted(lengths)}; every row needs one "
            "entry per class"
        )
    return np.array(labels.tolist(), dtype=np.float32)
