"""Sentiment data sets, their partitioning across federated nodes, and the hashing tokenizer.

This package imports nothing else of otfuse, so clients and the server can both use it.
"""

from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.partitioning import (
    PARTITIONINGS,
    ClientData,
    load_client_data,
    load_global_test,
)
from otfuse.data_partitions.sources import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    EVAL_SPLIT,
    load_split,
    resolve_data_dir,
)
from otfuse.data_partitions.tokenizer import HashTokenizer

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "EVAL_SPLIT",
    "PARTITIONINGS",
    "ClientData",
    "DataError",
    "HashTokenizer",
    "load_client_data",
    "load_global_test",
    "load_split",
    "resolve_data_dir",
]
