"""Row assignments of one corpus to partitions, with flwr-datasets partitioners where one exists.

Each function takes the size (and, where needed, the labels) of a corpus that the caller
has already shuffled, and returns one array of row positions per partition. Every node
computes the assignment of all partitions from the same corpus and seed, so the nodes
agree on it without talking to each other.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

_ROW = "row"
_LABEL = "label"
# flwr-datasets 0.6 raises ValueError with this text when Dirichlet resampling gives up.
_DIRICHLET_GAVE_UP = "max number of attempts"


class PartitionTooSmall(Exception):
    """A partitioner could not give every partition its minimum number of rows.

    ``sizes`` contains the partition sizes of the first attempt.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__(f"partition sizes {list(sizes)}")
        self.sizes = list(sizes)


def iid_indices(num_rows: int, num_partitions: int) -> list[np.ndarray]:
    """Cut rows into ``num_partitions`` contiguous shards whose sizes differ by at most one.

    Uses flwr-datasets' ``IidPartitioner``, which does not shuffle. Shard ``i`` is empty
    when ``i >= num_rows``.
    """
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = _row_dataset(num_rows)
    # datasets raises IndexError for a shard beyond the last row, so return it empty here.
    return [
        np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64)
        if i < num_rows else np.zeros(0, dtype=np.int64)
        for i in range(num_partitions)
    ]


def sized_indices(sizes: Sequence[int]) -> list[np.ndarray]:
    """Cut rows into contiguous shards of the given sizes with flwr-datasets' ``SizePartitioner``.

    Every size must be positive and the sizes must sum to the number of rows.
    """
    from flwr_datasets.partitioner import SizePartitioner

    partitioner = SizePartitioner([int(size) for size in sizes])
    partitioner.dataset = _row_dataset(int(sum(sizes)))
    return _partition_rows(partitioner, len(sizes))


def skewed_sizes(num_rows: int, weights: Sequence[float]) -> list[int]:
    """Split ``num_rows`` in proportion to ``weights``, rounding by largest remainder.

    The sizes sum to ``num_rows`` exactly. Ties in the remainders go to the earlier partition.
    """
    shares = np.asarray(weights, dtype=np.float64)
    exact = num_rows * shares / shares.sum()
    sizes = np.floor(exact).astype(np.int64)
    remainders = exact - sizes
    # A stable sort on the negated remainders puts the largest first, ties in partition order.
    for index in np.argsort(-remainders, kind="stable")[: num_rows - int(sizes.sum())]:
        sizes[index] += 1
    return sizes.tolist()


def power_weights(num_partitions: int, exponent: float) -> list[float]:
    """Return the size weight ``(i + 1) ** exponent`` of each partition ``i``.

    Exponent 0 gives equal sizes, 1 sizes that grow linearly with ``i`` (flwr-datasets'
    ``LinearPartitioner``) and 2 quadratically (its ``SquarePartitioner``).
    """
    return [float(i + 1) ** exponent for i in range(num_partitions)]


def dirichlet_indices(
    labels: np.ndarray, num_partitions: int, *, alpha: float, seed: int, min_examples: int
) -> list[np.ndarray]:
    """Split rows with label skew drawn from a Dirichlet distribution with concentration ``alpha``.

    Uses flwr-datasets' ``DirichletPartitioner``: for each class, the shares of the
    partitions are drawn from Dirichlet(alpha, ..., alpha). Smaller ``alpha`` gives each
    partition fewer classes. When a partition gets fewer than ``min_examples`` rows, the
    partitioner draws again, at most 10 times.

    Parameters
    ----------
    labels : array of shape (N,)
        Integer class of each row.
    num_partitions : int
        Number of partitions.
    alpha : float
        Concentration, > 0.
    seed : int
        Seeds the draws and the shuffle within each partition.
    min_examples : int
        Minimum rows per partition.

    Raises
    ------
    PartitionTooSmall
        If every draw left a partition with fewer than ``min_examples`` rows. Its ``sizes``
        are those of the first draw.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    def partition(minimum: int) -> DirichletPartitioner:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by=_LABEL, alpha=float(alpha),
            min_partition_size=minimum, self_balancing=False, shuffle=True, seed=seed,
        )
        partitioner.dataset = Dataset.from_dict(
            {_ROW: np.arange(len(labels), dtype=np.int64), _LABEL: np.asarray(labels, dtype=np.int64)}
        )
        return partitioner

    with warnings.catch_warnings(record=True) as retries:
        warnings.simplefilter("always")
        try:
            assignment = _partition_rows(partition(min_examples), num_partitions)
        except ValueError as error:
            if _DIRICHLET_GAVE_UP not in str(error):
                raise
            # The same seed reproduces the first draw, so its sizes name the small partitions.
            first_draw = _partition_rows(partition(0), num_partitions)
            raise PartitionTooSmall([len(rows) for rows in first_draw]) from None
    if retries:
        logger.info(
            "Dirichlet partitioning drew the label shares %d more times until every partition "
            "had at least %d rows (alpha %g)", len(retries), min_examples, alpha,
        )
    return assignment


def kfold_indices(labels: np.ndarray | None, num_rows: int, num_folds: int, seed: int) -> list[np.ndarray]:
    """Split rows into ``num_folds`` disjoint folds, stratified by class when ``labels`` is given.

    flwr-datasets has no k-fold partitioner, so this uses scikit-learn's ``StratifiedKFold``
    (or ``KFold`` when ``labels`` is None, as for multi-hot labels), shuffled with ``seed``.
    Each fold's positions are sorted.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    placeholder = np.zeros(num_rows)
    if labels is None:
        splits = KFold(n_splits=num_folds, shuffle=True, random_state=seed).split(placeholder)
    else:
        # StratifiedKFold warns when a class has fewer rows than folds; those rows still land in
        # some folds, so the warning adds nothing here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            splits = list(
                StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed).split(placeholder, labels)
            )
    return [np.sort(test).astype(np.int64) for _, test in splits]


def _partition_rows(partitioner, num_partitions: int) -> list[np.ndarray]:
    return [np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64) for i in range(num_partitions)]


def _row_dataset(num_rows: int):
    from datasets import Dataset

    return Dataset.from_dict({_ROW: np.arange(num_rows, dtype=np.int64)})
