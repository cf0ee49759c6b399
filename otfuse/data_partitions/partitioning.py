"""Per-node training data for the federated simulation, and the server's global test sets."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.labels import SINGLE_LABEL
from otfuse.data_partitions.sources import ALL_DATASETS, EVAL_SPLIT, LABEL_COLUMN, label_names, load_split

logger = logging.getLogger(__name__)

PARTITIONINGS = ("iid", "per-dataset")
TRAIN_SPLIT = "train"


@dataclass(frozen=True)
class ClientData:
    """One node's training rows and its local held-out test rows.

    Both frames have the columns of :func:`~otfuse.data_partitions.load_split`.
    """

    train: pd.DataFrame
    test: pd.DataFrame


def load_client_data(
    partitioning: str,
    partition_id: int,
    num_partitions: int,
    *,
    datasets: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    max_train_examples: int | None = None,
    local_test_fraction: float = 0.1,
    iid_dataset: str | None = None,
) -> ClientData:
    """Load the data of one node.

    A node reads only the training split of its own data set.

    Parameters
    ----------
    partitioning : str
        ``"per-dataset"``: node ``i`` gets the whole training split of ``datasets[i]``, so
        ``num_partitions`` must equal ``len(datasets)``.
        ``"iid"``: the training split of ``iid_dataset`` is shuffled with ``seed`` and cut
        into ``num_partitions`` equal contiguous shards by flwr-datasets' ``IidPartitioner``.
        Every node must use the same ``seed`` so that the shards are disjoint.
    partition_id : int
        This node's index, in ``[0, num_partitions)``.
    num_partitions : int
        Number of nodes.
    datasets : sequence of str
        Names from :data:`~otfuse.data_partitions.ALL_DATASETS`, without repeats and with
        the same classes.
    data_dir : str, os.PathLike or None
        Local data folder, see :func:`~otfuse.data_partitions.resolve_data_dir`.
    seed : int
        Seeds the iid shuffle and the shuffle of the node's own rows.
    max_train_examples : int or None
        Cap on the node's rows, applied after shuffling and before the local split, so
        the train part gets about ``(1 - local_test_fraction) * max_train_examples`` rows.
        None keeps all rows.
    local_test_fraction : float
        Share of the node's rows held out as its local test set, in ``[0, 1)``. When it is
        positive, at least one row is held out unless the node has a single row.
    iid_dataset : str or None
        The corpus split by ``"iid"``; defaults to ``datasets[0]``. Ignored by ``"per-dataset"``.

    Returns
    -------
    ClientData

    Raises
    ------
    DataError
        On an unknown partitioning or data set, a partition id out of range, a data set
        count that does not match, an invalid cap or fraction, or an empty partition.
    """
    names = _validate_names(datasets)
    _validate_request(partitioning, partition_id, num_partitions, names, max_train_examples,
                      local_test_fraction)

    partition_id, num_partitions = int(partition_id), int(num_partitions)
    if partitioning == "per-dataset":
        name = names[partition_id]
        rows = load_split(name, TRAIN_SPLIT, data_dir)
    else:
        name = iid_dataset if iid_dataset is not None else names[0]
        if name not in ALL_DATASETS:
            raise DataError(f"unknown iid_dataset {name!r}; choose one of {list(ALL_DATASETS)}")
        corpus = load_split(name, TRAIN_SPLIT, data_dir)
        rows = _iid_shard(corpus, partition_id, num_partitions, seed)

    if rows.empty:
        raise DataError(
            f"partition {partition_id} of {num_partitions} ({partitioning}, {name} train) is "
            f"empty; use fewer partitions than the {name} training split has rows"
        )

    rows = _shuffle(rows, seed)
    if max_train_examples is not None:
        rows = rows.iloc[: int(max_train_examples)].reset_index(drop=True)
    client = _split_local(rows, local_test_fraction)
    logger.debug(
        "partition %d/%d (%s, %s): %d train rows, %d local test rows",
        partition_id, num_partitions, partitioning, name, len(client.train), len(client.test),
    )
    return client


def load_global_test(
    datasets: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    *,
    max_examples_per_dataset: int | None = None,
    seed: int = 0,
    task: str = SINGLE_LABEL,
) -> dict[str, pd.DataFrame]:
    """Load the evaluation split of each data set, for scoring on the server.

    Parameters
    ----------
    datasets : sequence of str
        Names from :data:`~otfuse.data_partitions.ALL_DATASETS`, without repeats.
    data_dir : str, os.PathLike or None
        Local data folder, see :func:`~otfuse.data_partitions.resolve_data_dir`.
    max_examples_per_dataset : int or None
        Keep at most this many rows per data set, drawn at random with ``seed``.
        None keeps all rows.
    seed : int
        Seeds the subsample.
    task : str
        ``"single-label"`` or ``"multi-label"`` (XED only).

    Returns
    -------
    dict of str to pandas.DataFrame
        The split named in :data:`~otfuse.data_partitions.EVAL_SPLIT` for each data set,
        in the order given.
    """
    names = _validate_names(datasets)
    if max_examples_per_dataset is not None:
        _validate_positive("max_examples_per_dataset", max_examples_per_dataset)
    tests = {}
    for name in names:
        frame = load_split(name, EVAL_SPLIT[name], data_dir, task=task)
        if max_examples_per_dataset is not None and len(frame) > max_examples_per_dataset:
            frame = _shuffle(frame, seed).iloc[:max_examples_per_dataset].reset_index(drop=True)
        tests[name] = frame
    return tests


def _validate_names(datasets: Sequence[str]) -> list[str]:
    # A bare string is a sequence of characters, which would read as data sets "s", "s", ...
    if isinstance(datasets, str):
        raise DataError(f"datasets must be a list of names, got the string {datasets!r}; "
                        f"write [{datasets!r}]")
    names = list(datasets)
    if not names:
        raise DataError(f"datasets is empty; name at least one of {list(ALL_DATASETS)}")
    for name in names:
        if name not in ALL_DATASETS:
            raise DataError(f"unknown data set {name!r}; choose from {list(ALL_DATASETS)}")
        if names.count(name) > 1:
            raise DataError(f"data set {name!r} is listed twice in {names}; list each once")
    # One model head serves every node, so label ids must mean the same class everywhere.
    for name in names[1:]:
        if label_names(name) != label_names(names[0]):
            raise DataError(
                f"data sets {names[0]!r} and {name!r} have different classes; list data sets "
                "with the same classes only"
            )
    return names


def _is_integer(value: object) -> bool:
    # numpy integers pass. bool is rejected although it subclasses int.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate_positive(name: str, value: int) -> None:
    if not _is_integer(value) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def _validate_request(
    partitioning: str,
    partition_id: int,
    num_partitions: int,
    names: list[str],
    max_train_examples: int | None,
    local_test_fraction: float,
) -> None:
    if partitioning not in PARTITIONINGS:
        raise DataError(f"unknown partitioning {partitioning!r}; choose one of {list(PARTITIONINGS)}")
    _validate_positive("num_partitions", num_partitions)
    if partitioning == "per-dataset" and num_partitions != len(names):
        raise DataError(
            f"per-dataset partitioning gives one node per data set, so num_partitions must be "
            f"{len(names)} for {names}, got {num_partitions}; change one of them or use 'iid'"
        )
    if not _is_integer(partition_id) or not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition_id {partition_id!r} is out of range; it must be an integer in "
            f"[0, {num_partitions - 1}] for num_partitions={num_partitions}"
        )
    if max_train_examples is not None:
        _validate_positive("max_train_examples", max_train_examples)
    if not 0.0 <= local_test_fraction < 1.0:
        raise DataError(
            f"local_test_fraction must be in [0, 1), got {local_test_fraction!r}; "
            "use 0 to keep every row for training"
        )


def _iid_shard(corpus: pd.DataFrame, partition_id: int, num_partitions: int, seed: int) -> pd.DataFrame:
    # Imported here because the parameter name `datasets` of the public functions shadows it.
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    # IidPartitioner (flwr-datasets 0.6) cuts contiguous shards without shuffling, and the
    # files are sorted by label, so shuffle first or each shard would hold one class.
    shuffled = _shuffle(corpus, seed)
    # Shard i is empty exactly when there are fewer rows than shards and i >= rows, and
    # datasets raises IndexError for it, so return the empty frame here.
    if partition_id >= len(shuffled):
        return shuffled.iloc[:0]
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = Dataset.from_pandas(shuffled, preserve_index=False)
    shard = partitioner.load_partition(partition_id).to_pandas()
    return shard.astype({LABEL_COLUMN: np.int64}).reset_index(drop=True)


def _shuffle(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    order = np.random.default_rng(seed).permutation(len(frame))
    return frame.iloc[order].reset_index(drop=True)


def _split_local(rows: pd.DataFrame, local_test_fraction: float) -> ClientData:
    num_test = 0
    if local_test_fraction > 0:
        num_test = min(max(1, round(len(rows) * local_test_fraction)), len(rows) - 1)
    test = rows.iloc[:num_test].reset_index(drop=True)
    train = rows.iloc[num_test:].reset_index(drop=True)
    return ClientData(train=train, test=test)
