"""Data sets, their partitioning across federated nodes, and the hashing tokenizer.

This package imports nothing else of otfuse, so clients and the server can both use it.
"""

from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.labels import (
    EMOTION_LABELS,
    MULTI_LABEL,
    SENTIMENT_LABELS,
    SINGLE_LABEL,
    TASKS,
    label_array,
)
from otfuse.data_partitions.partitioning import (
    DEFAULT_ALPHA,
    PARTITIONINGS,
    ClientData,
    load_client_data,
    load_global_test,
    load_partitions,
)
from otfuse.data_partitions.sources import (
    ALL_DATASETS,
    DATA_DIR_ENV,
    DATASET_LANGUAGES,
    DATASET_NAMES,
    EVAL_SPLIT,
    XED_DATASETS,
    label_names,
    load_split,
    resolve_data_dir,
)
from otfuse.data_partitions.summary import partition_summary, token_count_summary
from otfuse.data_partitions.tokenizer import HashTokenizer

__all__ = [
    "ALL_DATASETS",
    "DATASET_LANGUAGES",
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "DEFAULT_ALPHA",
    "EMOTION_LABELS",
    "EVAL_SPLIT",
    "MULTI_LABEL",
    "PARTITIONINGS",
    "SENTIMENT_LABELS",
    "SINGLE_LABEL",
    "TASKS",
    "XED_DATASETS",
    "ClientData",
    "DataError",
    "HashTokenizer",
    "label_array",
    "label_names",
    "load_client_data",
    "load_global_test",
    "load_partitions",
    "load_split",
    "partition_summary",
    "resolve_data_dir",
    "token_count_summary",
]
