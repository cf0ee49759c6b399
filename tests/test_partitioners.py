"""Tests of every partitioning on the offline data: coverage, determinism, skew and errors."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from otfuse.data_partitions import (
    DATA_DIR_ENV,
    DataError,
    load_client_data,
    load_partitions,
    load_split,
)
from otfuse.data_partitions.partitioners import skewed_sizes

XED = ["xed-en", "xed-fi"]

# (partitioning, nodes, options, data sets whose training splits make up the corpus)
SPLITTING_CASES = [
    pytest.param("iid", 3, {"datasets": ["xed-fi"]}, ["xed-fi"], id="iid"),
    pytest.param("iid", 3, {"datasets": ["xed-fi"], "size_skew": 1.5}, ["xed-fi"], id="iid-size-skew"),
    pytest.param("iid", 3, {"datasets": ["xed-fi"], "size_weights": [5, 1, 2]}, ["xed-fi"], id="iid-size-weights"),
    pytest.param("iid", 2, {"datasets": XED, "pool_datasets": True}, XED, id="iid-pooled"),
    pytest.param("per-language", 5, {"datasets": XED}, XED, id="per-language"),
    pytest.param("per-language", 3, {"datasets": XED, "task": "multi-label", "size_skew": 1.0}, XED,
                 id="per-language-multi-label-skew"),
    pytest.param("dirichlet", 4, {"datasets": XED, "pool_datasets": True, "alpha": 0.5}, XED, id="dirichlet"),
    pytest.param("per-dataset", 2, {"datasets": XED}, XED, id="per-dataset"),
]


def rows(frame: pd.DataFrame) -> Counter:
    """Count each (text, label, language) row, so duplicates in the data are kept apart."""
    return Counter(zip(frame["text"], frame["label"], frame["language"]))


def corpus_rows(data_dir, names, task="single-label") -> Counter:
    return sum((rows(load_split(name, "train", data_dir, task=task)) for name in names), Counter())


def node_rows(clients) -> list[Counter]:
    return [rows(client.train) + rows(client.test) for client in clients]


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# Every splitting partitioning: sizes add up, no row twice, seeded


@pytest.mark.parametrize(("partitioning", "nodes", "options", "corpus"), SPLITTING_CASES)
def test_partitions_cover_corpus_once(data_dir, partitioning, nodes, options, corpus):
    clients = load_partitions(partitioning, nodes, data_dir=data_dir, **options)
    expected = corpus_rows(data_dir, corpus, options.get("task", "single-label"))
    assert sum(len(c.train) + len(c.test) for c in clients) == sum(expected.values())
    assert sum(node_rows(clients), Counter()) == expected


@pytest.mark.parametrize(("partitioning", "nodes", "options", "corpus"), SPLITTING_CASES)
def test_partitions_pairwise_disjoint(data_dir, partitioning, nodes, options, corpus):
    per_node = node_rows(load_partitions(partitioning, nodes, data_dir=data_dir, **options))
    for first in range(nodes):
        for second in range(first + 1, nodes):
            assert not per_node[first] & per_node[second], (first, second)


@pytest.mark.parametrize(("partitioning", "nodes", "options", "corpus"), SPLITTING_CASES)
def test_single_node_matches_all_nodes(data_dir, partitioning, nodes, options, corpus):
    everyone = load_partitions(partitioning, nodes, data_dir=data_dir, seed=3, **options)
    last = load_client_data(partitioning, nodes - 1, nodes, data_dir=data_dir, seed=3, **options)
    pd.testing.assert_frame_equal(last.train, everyone[-1].train)
    pd.testing.assert_frame_equal(last.test, everyone[-1].test)


@pytest.mark.parametrize(("partitioning", "nodes", "options", "corpus"), SPLITTING_CASES)
def test_same_seed_same_partition(data_dir, partitioning, nodes, options, corpus):
    first = load_client_data(partitioning, 1, nodes, data_dir=data_dir, seed=7, **options)
    second = load_client_data(partitioning, 1, nodes, data_dir=data_dir, seed=7, **options)
    pd.testing.assert_frame_equal(first.train, second.train)
    pd.testing.assert_frame_equal(first.test, second.test)


@pytest.mark.parametrize(("partitioning", "nodes", "options", "corpus"), SPLITTING_CASES)
def test_other_seed_other_partition(data_dir, partitioning, nodes, options, corpus):
    first = load_client_data(partitioning, 1, nodes, data_dir=data_dir, seed=7, **options)
    second = load_client_data(partitioning, 1, nodes, data_dir=data_dir, seed=8, **options)
    if partitioning == "per-dataset":
        # The node keeps its whole data set, and the seed only reorders it into train and test.
        assert first.test["text"].tolist() != second.test["text"].tolist()
    else:
        overlap = sum((rows(first.train) & rows(second.train)).values())
        assert overlap < 0.9 * len(first.train)


# Size skew


def test_size_skew_sizes(data_dir):
    clients = load_partitions("iid", 4, datasets=["xed-fi"], data_dir=data_dir, size_skew=1.0,
                              local_test_fraction=0.0)
    total = len(load_split("xed-fi", "train", data_dir))
    sizes = [len(client.train) for client in clients]
    for size, weight in zip(sizes, [1, 2, 3, 4]):
        assert abs(size - total * weight / 10) < 1


def test_size_weights_per_language(data_dir):
    clients = load_partitions("per-language", 4, datasets=XED, data_dir=data_dir,
                              size_weights=[1, 3, 1, 1], local_test_fraction=0.0)
    english = len(load_split("xed-en", "train", data_dir))
    assert len(clients[0].train) == pytest.approx(english / 4, abs=1)
    assert len(clients[1].train) == pytest.approx(3 * english / 4, abs=1)
    assert len(clients[2].train) == len(clients[3].train)


def test_skewed_sizes_sum_exactly():
    assert skewed_sizes(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(skewed_sizes(8_854, [1.0, 2.0 ** 1.5, 3.0 ** 1.5])) == 8_854


# per-language


def test_per_language_blocks(data_dir):
    clients = load_partitions("per-language", 5, datasets=XED, data_dir=data_dir, max_train_examples=50)
    languages = [set(client.train["language"]) for client in clients]
    assert languages == [{"en"}] * 3 + [{"fi"}] * 2


def test_per_language_order_follows_languages(data_dir):
    clients = load_partitions("per-language", 2, datasets=XED, data_dir=data_dir, languages=["fi", "en"],
                              max_train_examples=50)
    assert [set(client.train["language"]) for client in clients] == [{"fi"}, {"en"}]


# Dirichlet


def dominant_share(clients) -> float:
    """Mean share of each node's most common class."""
    return float(np.mean([client.train["label"].value_counts(normalize=True).max() for client in clients]))


def test_dirichlet_small_alpha_skews_labels(data_dir):
    options = {"datasets": ["xed-en"], "data_dir": data_dir}
    skewed = load_partitions("dirichlet", 4, alpha=0.1, **options)
    even = load_partitions("dirichlet", 4, alpha=1000.0, **options)
    assert dominant_share(skewed) > 0.4
    assert dominant_share(even) < 0.25


def test_dirichlet_min_examples_met(data_dir):
    clients = load_partitions("dirichlet", 8, datasets=["xed-en"], data_dir=data_dir, alpha=0.3,
                              min_examples=300, local_test_fraction=0.0)
    assert min(len(client.train) for client in clients) >= 300


# kfold


@pytest.fixture(scope="module")
def folds(data_dir):
    return load_partitions("kfold", 4, datasets=["xed-fi"], data_dir=data_dir, seed=1)


def test_kfold_folds_cover_corpus_once(data_dir, folds):
    held_out = sum((rows(client.test) for client in folds), Counter())
    assert held_out == corpus_rows(data_dir, ["xed-fi"])


def test_kfold_trains_on_other_folds(data_dir, folds):
    corpus = corpus_rows(data_dir, ["xed-fi"])
    for client in folds:
        assert not rows(client.train) & rows(client.test)
        assert rows(client.train) + rows(client.test) == corpus


def test_kfold_train_sizes_add_up(data_dir, folds):
    total = len(load_split("xed-fi", "train", data_dir))
    assert sum(len(client.train) for client in folds) == 3 * total


def test_kfold_folds_stratified(data_dir, folds):
    corpus = load_split("xed-fi", "train", data_dir)["label"].value_counts()
    for client in folds:
        counts = client.test["label"].value_counts()
        assert ((counts - corpus / 4).abs() <= 1).all()


def test_kfold_seeded(data_dir, folds):
    same = load_client_data("kfold", 2, 4, datasets=["xed-fi"], data_dir=data_dir, seed=1)
    other = load_client_data("kfold", 2, 4, datasets=["xed-fi"], data_dir=data_dir, seed=2)
    assert same.test["text"].tolist() == folds[2].test["text"].tolist()
    assert set(other.test["text"]) != set(folds[2].test["text"])


def test_kfold_cap_applies_to_corpus(data_dir):
    clients = load_partitions("kfold", 3, datasets=["xed-fi"], data_dir=data_dir, max_train_examples=300,
                              task="multi-label")
    assert [(len(c.train), len(c.test)) for c in clients] == [(200, 100)] * 3


# Errors


@pytest.mark.parametrize(
    ("partitioning", "nodes", "options", "message"),
    [
        pytest.param("dirichlet", 60, {"alpha": 0.01}, r"partition \d+ of 60 .* is empty.*larger alpha",
                     id="dirichlet-tiny-alpha"),
        pytest.param("iid", 20_000, {}, r"partition 8854 of 20000 .* is empty .*fewer partitions",
                     id="iid-too-many-nodes"),
        pytest.param("iid", 3, {"min_examples": 5_000}, "has 2952 examples, fewer than min_examples=5000",
                     id="iid-below-minimum"),
        pytest.param("iid", 3, {"size_skew": 12.0, "min_examples": 10}, "partition 0 of 3 .*smaller size_skew",
                     id="size-skew-too-steep"),
        pytest.param("kfold", 9_000, {}, "partition 8854 of 9000 .*fewer folds", id="kfold-too-many-folds"),
        pytest.param("per-dataset", 1, {"min_examples": 10_000}, "partition 0 of 1 .*lower min_examples",
                     id="per-dataset-below-minimum"),
    ],
)
def test_small_partition_rejected(data_dir, partitioning, nodes, options, message):
    with pytest.raises(DataError, match=message):
        load_client_data(partitioning, 0, nodes, datasets=["xed-fi"], data_dir=data_dir, **options)


@pytest.mark.parametrize(
    ("partitioning", "nodes", "options", "message"),
    [
        pytest.param("per-language", 2, {"datasets": XED, "languages": ["sv"]}, "unknown language 'sv'",
                     id="unknown-language"),
        pytest.param("per-language", 2, {"datasets": ["sst2"], "languages": ["fi"]},
                     r"language 'fi' has no data set.*xed-fi", id="language-without-data"),
        pytest.param("per-language", 1, {"datasets": XED}, "at least 2", id="fewer-nodes-than-languages"),
        pytest.param("kfold", 1, {"datasets": ["xed-fi"]}, "at least 2 folds", id="one-fold"),
        pytest.param("dirichlet", 2, {"datasets": ["xed-fi"], "task": "multi-label"}, "needs task 'single-label'",
                     id="dirichlet-multi-label"),
        pytest.param("dirichlet", 2, {"datasets": ["xed-fi"], "alpha": 0.0}, "alpha must be a positive",
                     id="zero-alpha"),
        pytest.param("dirichlet", 2, {"datasets": ["xed-fi"], "size_skew": 1.0}, "apply only to",
                     id="skew-with-dirichlet"),
        pytest.param("iid", 2, {"datasets": ["xed-fi"], "size_weights": [1.0]}, "give one weight per node",
                     id="weights-count"),
        pytest.param("iid", 2, {"datasets": ["xed-fi"], "size_weights": [1.0, -1.0]}, "positive finite",
                     id="negative-weight"),
        pytest.param("iid", 2, {"datasets": ["xed-fi"], "size_weights": [1, 2], "size_skew": 1.0}, "not both",
                     id="skew-and-weights"),
        pytest.param("iid", 2, {"datasets": ["xed-fi"], "min_examples": 0}, "min_examples must be a positive",
                     id="zero-minimum"),
        pytest.param("iid", 2, {"datasets": ["sst2", "xed-en"]}, "have different classes", id="mixed-labels"),
        pytest.param("iid", 2, {"datasets": ["sst2"], "task": "multi-label"}, "needs multi-label data",
                     id="multi-label-sentiment"),
        pytest.param("iid", 2, {"datasets": ["xed-en"], "iid_dataset": "sst2"}, "iid_dataset 'sst2' has other classes",
                     id="iid-dataset-other-classes"),
    ],
)
def test_invalid_option_rejected(data_dir, partitioning, nodes, options, message):
    with pytest.raises(DataError, match=message):
        load_client_data(partitioning, 0, nodes, data_dir=data_dir, **options)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(DataError, match=r"xed/train\.parquet' not found"):
        load_client_data("per-language", 0, 2, datasets=XED, data_dir=tmp_path)


def test_missing_column_rejected(tmp_path):
    (tmp_path / "xed").mkdir()
    pd.DataFrame({"sentence": ["Hi."], "language": ["en"]}).to_parquet(tmp_path / "xed" / "train.parquet")
    with pytest.raises(DataError, match="has no column 'labels'"):
        load_client_data("iid", 0, 2, datasets=["xed-en"], data_dir=tmp_path)
