"""Per-node training data for the federated simulation, and the server's global test sets.

Every partitioning is deterministic: a node computes the assignment of all nodes from the
same corpus and ``seed``, and keeps its own. So every node of a run must use the same
``seed`` and options, or the partitions overlap or leave rows out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.labels import SINGLE_LABEL
from otfuse.data_partitions.partitioners import (
    PartitionTooSmall,
    dirichlet_indices,
    iid_indices,
    kfold_indices,
    power_weights,
    sized_indices,
    skewed_sizes,
)
from otfuse.data_partitions.request import (
    DEFAULT_ALPHA,
    DIRICHLET,
    IID,
    KFOLD,
    PARTITIONINGS,
    PER_DATASET,
    PER_LANGUAGE,
    PartitionRequest,
    make_request,
    validate_names,
    validate_partition_id,
    validate_positive,
)
from otfuse.data_partitions.sources import DATASET_LANGUAGES, EVAL_SPLIT, LABEL_COLUMN, load_split

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ALPHA", "PARTITIONINGS", "ClientData", "load_client_data", "load_global_test", "load_partitions"]

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
    task: str = SINGLE_LABEL,
    alpha: float = DEFAULT_ALPHA,
    size_skew: float = 0.0,
    size_weights: Sequence[float] | None = None,
    min_examples: int = 1,
    languages: Sequence[str] | None = None,
    pool_datasets: bool = False,
) -> ClientData:
    """Load the data of one node.

    A node reads only the training splits it needs: its own data set (``per-dataset``),
    the data sets of its language (``per-language``) or the corpus (the others).

    Parameters
    ----------
    partitioning : str
        ``"per-dataset"``: node ``i`` gets the whole training split of ``datasets[i]``, so
        ``num_partitions`` must equal ``len(datasets)``.
        ``"iid"``: the corpus is shuffled with ``seed`` and cut into ``num_partitions``
        contiguous shards by flwr-datasets' ``IidPartitioner`` (``SizePartitioner`` with a
        size skew).
        ``"per-language"``: the languages of ``datasets`` (or ``languages``) get
        consecutive blocks of nodes, as equal as possible, earlier languages taking the
        remainder: with ``["xed-en", "xed-fi"]`` and 5 nodes, nodes 0-2 are English and
        3-4 Finnish. Each language's training rows are shuffled and cut into shards as
        for ``"iid"``.
        ``"dirichlet"``: label skew. flwr-datasets' ``DirichletPartitioner`` gives each
        class to the nodes in shares drawn from Dirichlet(``alpha``). Single-label only.
        ``"kfold"``: the corpus is cut into ``num_partitions`` folds (stratified by class
        for single-label data). Node ``i`` trains on every fold but fold ``i`` and uses
        fold ``i`` as its local test set, so the training sets overlap, as in
        cross-validation.
        The corpus is ``iid_dataset``'s training split, or every data set's with
        ``pool_datasets``.
    partition_id : int
        This node's index, in ``[0, num_partitions)``.
    num_partitions : int
        Number of nodes.
    datasets : sequence of str
        Names from :data:`~otfuse.data_partitions.ALL_DATASETS`, without repeats and with
        the same classes (sentiment and XED do not mix).
    data_dir : str, os.PathLike or None
        Local data folder, see :func:`~otfuse.data_partitions.resolve_data_dir`.
    seed : int
        Seeds the corpus shuffle, the Dirichlet draws, the folds and the shuffle of the
        node's own rows.
    max_train_examples : int or None
        Cap on the node's rows, applied after shuffling and before the local split, so
        the train part gets about ``(1 - local_test_fraction) * max_train_examples`` rows.
        With ``"kfold"`` the cap applies to the corpus before folding. None keeps all rows.
    local_test_fraction : float
        Share of the node's rows held out as its local test set, in ``[0, 1)``. When it is
        positive, at least one row is held out unless the node has a single row. Not used
        by ``"kfold"``, whose local test set is the node's fold.
    iid_dataset : str or None
        The corpus of ``"iid"``, ``"dirichlet"`` and ``"kfold"``; defaults to ``datasets[0]``.
    task : str
        ``"single-label"`` or ``"multi-label"`` (XED only); see
        :func:`~otfuse.data_partitions.load_split`.
    alpha : float
        Dirichlet concentration for ``"dirichlet"``, > 0. Smaller values give each node
        fewer classes; 100 is close to iid.
    size_skew : float
        For ``"iid"`` and ``"per-language"``: the ``j``-th node of a corpus gets a share
        proportional to ``(j + 1) ** size_skew``. 0 gives equal shards, 1 linear growth.
    size_weights : sequence of float or None
        For ``"iid"`` and ``"per-language"``: one positive weight per node, used instead
        of ``size_skew``. A node's share of its corpus is its weight over the sum of the
        weights of the nodes that split that corpus.
    min_examples : int
        Minimum rows per node, counted before the cap and the local split.
    languages : sequence of str or None
        For ``"per-language"``: the languages to use, in node order; defaults to those of
        ``datasets`` in order of appearance. Ignored, with a warning, by other partitionings.
    pool_datasets : bool
        For ``"iid"``, ``"dirichlet"`` and ``"kfold"``: split the union of all ``datasets``
        instead of ``iid_dataset``.

    Returns
    -------
    ClientData

    Raises
    ------
    DataError
        On an unknown partitioning, data set, task or language, a partition id out of
        range, a node count that does not fit the partitioning, an invalid option, or a
        node with fewer than ``min_examples`` rows. That error names the node and the fix.
    """
    request = make_request(
        partitioning, num_partitions, datasets=datasets, data_dir=data_dir, seed=seed,
        max_train_examples=max_train_examples, local_test_fraction=local_test_fraction,
        iid_dataset=iid_dataset, task=task, alpha=alpha, size_skew=size_skew,
        size_weights=size_weights, min_examples=min_examples, languages=languages,
        pool_datasets=pool_datasets,
    )
    validate_partition_id(partition_id, request.num_partitions)
    client = _load_clients(request, [int(partition_id)])[int(partition_id)]
    logger.debug(
        "partition %d/%d (%s): %d train rows, %d local test rows",
        partition_id, num_partitions, partitioning, len(client.train), len(client.test),
    )
    return client


def load_partitions(
    partitioning: str,
    num_partitions: int,
    *,
    datasets: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    max_train_examples: int | None = None,
    local_test_fraction: float = 0.1,
    iid_dataset: str | None = None,
    task: str = SINGLE_LABEL,
    alpha: float = DEFAULT_ALPHA,
    size_skew: float = 0.0,
    size_weights: Sequence[float] | None = None,
    min_examples: int = 1,
    languages: Sequence[str] | None = None,
    pool_datasets: bool = False,
) -> list[ClientData]:
    """Load the data of every node at once, reading each file once.

    Takes the parameters of :func:`load_client_data` except ``partition_id``, and returns
    the same data that it returns for partitions ``0`` to ``num_partitions - 1``.
    """
    request = make_request(
        partitioning, num_partitions, datasets=datasets, data_dir=data_dir, seed=seed,
        max_train_examples=max_train_examples, local_test_fraction=local_test_fraction,
        iid_dataset=iid_dataset, task=task, alpha=alpha, size_skew=size_skew,
        size_weights=size_weights, min_examples=min_examples, languages=languages,
        pool_datasets=pool_datasets,
    )
    clients = _load_clients(request, list(range(request.num_partitions)))
    return [clients[i] for i in range(request.num_partitions)]


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
    names = validate_names(datasets)
    if max_examples_per_dataset is not None:
        validate_positive("max_examples_per_dataset", max_examples_per_dataset)
    tests = {}
    for name in names:
        frame = load_split(name, EVAL_SPLIT[name], data_dir, task=task)
        if max_examples_per_dataset is not None and len(frame) > max_examples_per_dataset:
            frame = _shuffle(frame, seed).iloc[:max_examples_per_dataset].reset_index(drop=True)
        tests[name] = frame
    return tests


def _load_clients(request: PartitionRequest, partition_ids: Sequence[int]) -> dict[int, ClientData]:
    if request.partitioning == PER_DATASET:
        return {i: _per_dataset_client(request, i) for i in partition_ids}
    if request.partitioning == PER_LANGUAGE:
        return _per_language_clients(request, partition_ids)
    corpus = _shuffle(_read_train(request, request.corpus_names), request.seed)
    corpus_name = "+".join(request.corpus_names)
    if request.partitioning == KFOLD:
        return _kfold_clients(request, corpus, corpus_name, partition_ids)
    all_ids = list(range(request.num_partitions))
    if request.partitioning == DIRICHLET:
        shards = _dirichlet_shards(request, corpus, corpus_name)
    else:
        shards = _shards(request, len(corpus), all_ids, f"{IID}, {corpus_name} train")
    return {i: _finish(corpus.iloc[shards[i]], request) for i in partition_ids}


def _per_dataset_client(request: PartitionRequest, partition_id: int) -> ClientData:
    name = request.names[partition_id]
    rows = load_split(name, TRAIN_SPLIT, request.data_dir, task=request.task)
    _check_sizes(
        request, {partition_id: len(rows)}, f"{PER_DATASET}, {name} train",
        f"lower min_examples (now {request.min_examples}) or choose a larger data set",
    )
    return _finish(rows, request)


def _per_language_clients(request: PartitionRequest, partition_ids: Sequence[int]) -> dict[int, ClientData]:
    clients = {}
    for language, group in _language_groups(request):
        requested = [i for i in group if i in partition_ids]
        if not requested:
            continue
        names = tuple(name for name in request.names if DATASET_LANGUAGES[name] == language)
        corpus = _shuffle(_read_train(request, names), request.seed)
        shards = _shards(request, len(corpus), group, f"{PER_LANGUAGE}, {language}: {'+'.join(names)} train")
        for position, partition_id in enumerate(group):
            if partition_id in requested:
                clients[partition_id] = _finish(corpus.iloc[shards[position]], request)
    return clients


def _language_groups(request: PartitionRequest) -> list[tuple[str, list[int]]]:
    """Give each language a block of consecutive node ids; earlier languages take the remainder."""
    base, extra = divmod(request.num_partitions, len(request.languages))
    groups, start = [], 0
    for index, language in enumerate(request.languages):
        count = base + (1 if index < extra else 0)
        groups.append((language, list(range(start, start + count))))
        start += count
    return groups


def _shards(request: PartitionRequest, num_rows: int, group: list[int], description: str) -> list[np.ndarray]:
    """Cut ``num_rows`` shuffled rows among the nodes in ``group``, equally or with the size skew."""
    if request.size_weights is not None:
        weights = [request.size_weights[i] for i in group]
    elif request.size_skew != 0:
        weights = power_weights(len(group), request.size_skew)
    else:
        weights = None
    if weights is None:
        sizes = [len(shard) for shard in np.array_split(np.arange(num_rows), len(group))]
    else:
        sizes = skewed_sizes(num_rows, weights)
    fix = f"use fewer partitions than the {num_rows} rows allow"
    if weights is not None:
        fix += ", a smaller size_skew or more even size_weights"
    _check_sizes(request, dict(zip(group, sizes)), description, fix)
    return iid_indices(num_rows, len(group)) if weights is None else sized_indices(sizes)


def _dirichlet_shards(request: PartitionRequest, corpus: pd.DataFrame, corpus_name: str) -> list[np.ndarray]:
    description = f"{DIRICHLET} alpha={request.alpha:g}, {corpus_name} train"
    fix = f"use a larger alpha (now {request.alpha:g}), fewer partitions or a smaller min_examples"
    needed = request.num_partitions * request.min_examples
    if len(corpus) < needed:
        _check_sizes(request, {request.num_partitions - 1: 0}, description, fix)
    try:
        return dirichlet_indices(
            corpus[LABEL_COLUMN].to_numpy(dtype=np.int64), request.num_partitions,
            alpha=request.alpha, seed=request.seed, min_examples=request.min_examples,
        )
    except PartitionTooSmall as error:
        _check_sizes(request, dict(enumerate(error.sizes)), description + ", after 10 draws", fix)
        # Not reached: the partitioner gives up only when a size is below the minimum.
        raise DataError(f"{description}: partition sizes {error.sizes}; {fix}") from None


def _kfold_clients(
    request: PartitionRequest, corpus: pd.DataFrame, corpus_name: str, partition_ids: Sequence[int]
) -> dict[int, ClientData]:
    if request.max_train_examples is not None:
        corpus = corpus.iloc[: request.max_train_examples].reset_index(drop=True)
    num_folds = request.num_partitions
    fold_sizes = [len(fold) for fold in np.array_split(np.arange(len(corpus)), num_folds)]
    description = f"{KFOLD} with {num_folds} folds, {corpus_name} train"
    fix = f"use fewer folds than the {len(corpus)} rows allow"
    # Every fold needs a row to test on, and every node's other folds min_examples rows.
    _check_sizes(request, {i: size for i, size in enumerate(fold_sizes) if size == 0}, description, fix)
    _check_sizes(request, {i: len(corpus) - size for i, size in enumerate(fold_sizes)}, description, fix)
    labels = corpus[LABEL_COLUMN].to_numpy(dtype=np.int64) if request.task == SINGLE_LABEL else None
    folds = kfold_indices(labels, len(corpus), num_folds, request.seed)
    clients = {}
    for partition_id in partition_ids:
        held_out = np.zeros(len(corpus), dtype=bool)
        held_out[folds[partition_id]] = True
        clients[partition_id] = ClientData(
            train=corpus[~held_out].reset_index(drop=True),
            test=corpus[held_out].reset_index(drop=True),
        )
    return clients


def _check_sizes(request: PartitionRequest, sizes: dict[int, int], description: str, fix: str) -> None:
    """Raise DataError naming the first node with fewer than ``min_examples`` rows."""
    small = {i: size for i, size in sorted(sizes.items()) if size < request.min_examples}
    if not small:
        return
    first, size = next(iter(small.items()))
    state = "is empty" if size == 0 else f"has {size} examples, fewer than min_examples={request.min_examples}"
    others = f" (and {len(small) - 1} more)" if len(small) > 1 else ""
    raise DataError(
        f"partition {first} of {request.num_partitions} ({description}) {state}{others}; {fix}"
    )


def _read_train(request: PartitionRequest, names: Sequence[str]) -> pd.DataFrame:
    frames = [load_split(name, TRAIN_SPLIT, request.data_dir, task=request.task) for name in names]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _finish(rows: pd.DataFrame, request: PartitionRequest) -> ClientData:
    """Shuffle a node's rows, cap them and hold out its local test set."""
    rows = _shuffle(rows.reset_index(drop=True), request.seed)
    if request.max_train_examples is not None:
        rows = rows.iloc[: request.max_train_examples].reset_index(drop=True)
    return _split_local(rows, request.local_test_fraction)


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
