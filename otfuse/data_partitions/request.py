"""Validation of a partition request into one checked, immutable object."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass

from otfuse.data_partitions.errors import DataError
from otfuse.data_partitions.labels import SINGLE_LABEL, check_task
from otfuse.data_partitions.sources import ALL_DATASETS, DATASET_LANGUAGES, XED_DATASETS, label_names

logger = logging.getLogger(__name__)

IID = "iid"
PER_DATASET = "per-dataset"
PER_LANGUAGE = "per-language"
DIRICHLET = "dirichlet"
KFOLD = "kfold"
PARTITIONINGS: tuple[str, ...] = (IID, PER_DATASET, PER_LANGUAGE, DIRICHLET, KFOLD)
#: Partitionings that split one corpus into shards, and so accept a size skew.
SHARDED = (IID, PER_LANGUAGE)

DEFAULT_ALPHA = 0.5


@dataclass(frozen=True)
class PartitionRequest:
    """A checked partition request; build it with :func:`make_request`.

    ``size_weights`` contains one positive weight per partition, or None. ``languages``
    lists the per-language groups in node order.
    """

    partitioning: str
    num_partitions: int
    names: tuple[str, ...]
    data_dir: str | os.PathLike | None
    seed: int
    max_train_examples: int | None
    local_test_fraction: float
    corpus_names: tuple[str, ...]
    task: str
    alpha: float
    size_skew: float
    size_weights: tuple[float, ...] | None
    min_examples: int
    languages: tuple[str, ...]


def make_request(
    partitioning: str,
    num_partitions: int,
    *,
    datasets: Sequence[str],
    data_dir: str | os.PathLike | None,
    seed: int,
    max_train_examples: int | None,
    local_test_fraction: float,
    iid_dataset: str | None,
    task: str,
    alpha: float,
    size_skew: float,
    size_weights: Sequence[float] | None,
    min_examples: int,
    languages: Sequence[str] | None,
    pool_datasets: bool,
) -> PartitionRequest:
    """Check every option of a partition request, raising DataError that names the fix."""
    names = validate_names(datasets)

    if partitioning not in PARTITIONINGS:
        raise DataError(f"unknown partitioning {partitioning!r}; choose one of {list(PARTITIONINGS)}")
    validate_positive("num_partitions", num_partitions)
    num_partitions = int(num_partitions)
    if partitioning == PER_DATASET and num_partitions != len(names):
        raise DataError(
            f"per-dataset partitioning gives one node per data set, so num_partitions must be "
            f"{len(names)} for {names}, got {num_partitions}; change one of them or use 'iid'"
        )
    if partitioning == KFOLD and num_partitions < 2:
        raise DataError(
            f"kfold partitioning makes one fold per node and needs at least 2 folds, got "
            f"num_partitions={num_partitions}; use 2 or more, or 'iid' for a single node"
        )

    if max_train_examples is not None:
        validate_positive("max_train_examples", max_train_examples)
    if not 0.0 <= local_test_fraction < 1.0:
        raise DataError(
            f"local_test_fraction must be in [0, 1), got {local_test_fraction!r}; "
            "use 0 to keep every row for training"
        )
    validate_positive("min_examples", min_examples)

    _validate_task(task, names)
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha must be a positive finite number, got {alpha!r}; larger values give less label skew")
    if partitioning == DIRICHLET and task != SINGLE_LABEL:
        raise DataError(
            "dirichlet partitioning skews the class of each row and needs task 'single-label', "
            f"got {task!r}; use 'iid', 'per-language' or 'kfold' for multi-label data"
        )

    groups = _languages(partitioning, num_partitions, names, languages)
    return PartitionRequest(
        partitioning=partitioning,
        num_partitions=num_partitions,
        names=tuple(names),
        data_dir=data_dir,
        seed=seed,
        max_train_examples=None if max_train_examples is None else int(max_train_examples),
        local_test_fraction=float(local_test_fraction),
        corpus_names=_corpus_names(names, iid_dataset, pool_datasets),
        task=task,
        alpha=float(alpha),
        size_skew=float(size_skew),
        size_weights=_size_weights(partitioning, num_partitions, size_skew, size_weights),
        min_examples=int(min_examples),
        languages=groups,
    )


def validate_names(datasets: Sequence[str]) -> list[str]:
    """Return the data set names as a list, raising DataError for an invalid or mixed list."""
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
    _validate_same_labels(names)
    return names


def _validate_same_labels(names: Sequence[str]) -> None:
    # One model head serves every node, so label ids must mean the same class everywhere.
    first = names[0]
    for name in names[1:]:
        if label_names(name) != label_names(first):
            raise DataError(
                f"data sets {first!r} (labels {list(label_names(first))}) and {name!r} (labels "
                f"{list(label_names(name))}) have different classes; list data sets with the "
                "same classes only"
            )


def is_integer(value: object) -> bool:
    """Return whether ``value`` is an integer; numpy integers pass and bool does not."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_positive(name: str, value: int) -> None:
    """Raise DataError unless ``value`` is an integer of at least 1."""
    if not is_integer(value) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def validate_partition_id(partition_id: int, num_partitions: int) -> None:
    """Raise DataError unless ``partition_id`` is an integer in ``[0, num_partitions)``."""
    if not is_integer(partition_id) or not 0 <= partition_id < num_partitions:
        raise DataError(
            f"partition_id {partition_id!r} is out of range; it must be an integer in "
            f"[0, {num_partitions - 1}] for num_partitions={num_partitions}"
        )


def _validate_task(task: str, names: Sequence[str]) -> None:
    check_task(task)
    if task != SINGLE_LABEL:
        others = [name for name in names if name not in XED_DATASETS]
        if others:
            raise DataError(
                f"task {task!r} needs multi-label data, but {others} have one label per text; "
                f"use task 'single-label' or only {list(XED_DATASETS)}"
            )


def _corpus_names(names: list[str], iid_dataset: str | None, pool_datasets: bool) -> tuple[str, ...]:
    if pool_datasets:
        return tuple(names)
    name = iid_dataset if iid_dataset is not None else names[0]
    if name not in ALL_DATASETS:
        raise DataError(f"unknown iid_dataset {name!r}; choose one of {list(ALL_DATASETS)}")
    if label_names(name) != label_names(names[0]):
        raise DataError(
            f"iid_dataset {name!r} has other classes than the data sets {names}; set "
            f"iid_dataset to one of {names}, or pool_datasets to split all of them"
        )
    return (name,)


def _size_weights(
    partitioning: str, num_partitions: int, size_skew: float, size_weights: Sequence[float] | None
) -> tuple[float, ...] | None:
    if not (isinstance(size_skew, numbers.Real) and math.isfinite(size_skew)):
        raise DataError(f"size_skew must be a finite number, got {size_skew!r}; 0 gives equal shards")
    if size_skew == 0 and size_weights is None:
        return None
    if partitioning not in SHARDED:
        raise DataError(
            f"size_skew and size_weights apply only to {list(SHARDED)}, not to {partitioning!r}; "
            "drop them (dirichlet sizes follow from alpha, kfold folds are equal)"
        )
    if size_weights is None:
        # The exponent applies within each language group, so the partitioner resolves it.
        return None
    if size_skew != 0:
        raise DataError(
            f"give size_skew ({size_skew!r}) or size_weights, not both; size_weights sets each "
            "node's share directly"
        )
    weights = list(size_weights)
    if len(weights) != num_partitions:
        raise DataError(
            f"size_weights has {len(weights)} entries but num_partitions is {num_partitions}; "
            "give one weight per node"
        )
    if not all(isinstance(w, numbers.Real) and math.isfinite(w) and w > 0 for w in weights):
        raise DataError(f"size_weights must be positive finite numbers, got {weights}")
    return tuple(float(w) for w in weights)


def _languages(
    partitioning: str, num_partitions: int, names: list[str], languages: Sequence[str] | None
) -> tuple[str, ...]:
    present = list(dict.fromkeys(DATASET_LANGUAGES[name] for name in names))
    if partitioning != PER_LANGUAGE:
        if languages is not None:
            logger.warning("languages=%s is ignored: only 'per-language' partitioning uses it", list(languages))
        return tuple(present)
    if languages is None:
        chosen = present
    else:
        if isinstance(languages, str):
            raise DataError(f"languages must be a list of codes, got the string {languages!r}; write [{languages!r}]")
        chosen = list(languages)
        known = sorted(set(DATASET_LANGUAGES.values()))
        for language in chosen:
            if language not in known:
                raise DataError(f"unknown language {language!r}; choose from {known}")
            if language not in present:
                raise DataError(
                    f"language {language!r} has no data set among {names}; add one "
                    f"({[n for n, code in DATASET_LANGUAGES.items() if code == language]}) or drop it"
                )
            if chosen.count(language) > 1:
                raise DataError(f"language {language!r} is listed twice in {chosen}; list each once")
    if num_partitions < len(chosen):
        raise DataError(
            f"per-language partitioning needs at least one node per language, so num_partitions "
            f"must be at least {len(chosen)} for languages {chosen}, got {num_partitions}"
        )
    return tuple(chosen)
