"""This node's partition, tokenized once per process."""

from __future__ import annotations

import functools
from logging import INFO
from dataclasses import dataclass

import numpy as np
from flwr.common import log

from otfuse.data_partitions import load_client_data
from otfuse.runconfig import (
    DATA_DIR,
    DIRICHLET_ALPHA,
    LOCAL_TEST_FRACTION,
    MAX_TRAIN_EXAMPLES,
    PARTITIONING,
    SEED,
    SIZE_SKEW,
    RunConfig,
)
from otfuse.task import Tokenizer, run_model

# One entry per partition request; a simulation process serves a few nodes at most.
_CACHE_SIZE = 8


@dataclass(frozen=True)
class TokenizedPartition:
    """Token ids (N, max_len) and labels (N,) of a node's train part and local test part."""

    train_ids: np.ndarray
    train_labels: np.ndarray
    test_ids: np.ndarray
    test_labels: np.ndarray


def load_partition(config: RunConfig, partition_id: int, num_partitions: int) -> TokenizedPartition:
    """Load and tokenize this node's partition; repeated calls in one process hit a cache."""
    return _load_cached(
        config.get(PARTITIONING),
        partition_id,
        num_partitions,
        config.datasets,
        config.get(DATA_DIR) or None,
        config.get(SEED),
        config.optional_cap(MAX_TRAIN_EXAMPLES),
        config.get(LOCAL_TEST_FRACTION),
        config.iid_dataset,
        config.get(DIRICHLET_ALPHA),
        config.get(SIZE_SKEW),
        run_model(config).tokenizer(),
    )


# Ray keeps a simulation's ClientApp actors alive across rounds, so a cache in the process
# saves re-reading and re-tokenizing the Parquet files every round. Context.state would
# send the arrays through Flower's record store instead.
@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_cached(
    partitioning: str,
    partition_id: int,
    num_partitions: int,
    datasets: tuple[str, ...],
    data_dir: str | None,
    seed: int,
    max_train_examples: int | None,
    local_test_fraction: float,
    iid_dataset: str | None,
    alpha: float,
    size_skew: float,
    tokenizer: Tokenizer,
) -> TokenizedPartition:
    data = load_client_data(
        partitioning,
        partition_id,
        num_partitions,
        datasets=datasets,
        data_dir=data_dir,
        seed=seed,
        max_train_examples=max_train_examples,
        local_test_fraction=local_test_fraction,
        iid_dataset=iid_dataset,
        alpha=alpha,
        size_skew=size_skew,
    )
    partition = TokenizedPartition(
        train_ids=tokenizer.encode(data.train["text"].tolist()),
        train_labels=data.train["label"].to_numpy(dtype=np.int64),
        test_ids=tokenizer.encode(data.test["text"].tolist()),
        test_labels=data.test["label"].to_numpy(dtype=np.int64),
    )
    log(
        INFO,
        "partition %d/%d: %d train and %d local test examples",
        partition_id, num_partitions, len(partition.train_labels), len(partition.test_labels),
    )
    return partition
