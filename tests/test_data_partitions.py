"""Tests of data set loading, label mapping and node partitioning on the offline data."""

import logging
from collections import Counter

import pandas as pd
import pytest

from otfuse.data_partitions import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    EVAL_SPLIT,
    DataError,
    load_client_data,
    load_global_test,
    load_split,
    resolve_data_dir,
)

COLUMNS = ["text", "label", "dataset", "language"]


def rows(frame: pd.DataFrame) -> Counter:
    """Count each (text, label) pair, so duplicates in the data are kept apart."""
    return Counter(zip(frame["text"], frame["label"]))


def write_parquet(folder, name, split, frame):
    (folder / name).mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / name / f"{split}.parquet")


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# Loading and label mapping


@pytest.mark.parametrize("name", DATASET_NAMES)
@pytest.mark.parametrize("split", ["train", "eval"])
def test_load_split_schema(data_dir, name, split):
    frame = load_split(name, EVAL_SPLIT[name] if split == "eval" else split, data_dir)
    assert list(frame.columns) == COLUMNS
    assert frame["label"].dtype == "int64"
    assert set(frame["label"].unique()) == {0, 1}
    assert (frame["dataset"] == name).all()
    assert frame["text"].map(type).eq(str).all()


def test_sst2_label_counts(data_dir):
    counts = load_split("sst2", "validation", data_dir)["label"].value_counts()
    assert counts[0] == 428
    assert counts[1] == 444


def test_sentiment140_neutral_dropped(data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="otfuse.data_partitions.sources"):
        frame = load_split("sentiment140", "test", data_dir)
    assert len(frame) == 498 - 139
    assert "dropped 139 neutral rows" in caplog.text


def test_sentiment140_positive_maps_to_one(data_dir):
    counts = load_split("sentiment140", "test", data_dir)["label"].value_counts()
    assert counts[0] == 177
    assert counts[1] == 182


def test_sst2_test_unlabelled_rejected(data_dir):
    with pytest.raises(DataError, match="unlabelled.*'validation'"):
        load_split("sst2", "test", data_dir)


def test_unknown_dataset_rejected(data_dir):
    with pytest.raises(DataError, match="unknown data set 'yelp'"):
        load_split("yelp", "train", data_dir)


def test_unknown_split_rejected(data_dir):
    with pytest.raises(DataError, match="unknown split 'validation' of data set 'imdb'"):
        load_split("imdb", "validation", data_dir)


def test_missing_file_rejected(tmp_path):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(DataError, match=r"sst2/train\.parquet' not found"):
        load_split("sst2", "train", tmp_path)


def test_missing_column_rejected(tmp_path):
    write_parquet(tmp_path, "sst2", "train", pd.DataFrame({"text": ["fine"], "label": [1]}))
    with pytest.raises(DataError, match="has no column 'sentence'"):
        load_split("sst2", "train", tmp_path)


def test_unknown_label_rejected(tmp_path):
    frame = pd.DataFrame({"text": ["a", "b"], "sentiment": [0, 3]})
    write_parquet(tmp_path, "sentiment140", "train", frame)
    with pytest.raises(DataError, match=r"label values \[3\]"):
        load_split("sentiment140", "train", tmp_path)


def test_missing_text_rejected(tmp_path):
    frame = pd.DataFrame({"text": ["a", None], "label": [0, 1]})
    write_parquet(tmp_path, "imdb", "train", frame)
    with pytest.raises(DataError, match="1 missing values in column 'text'"):
        load_split("imdb", "train", tmp_path)


# Choice of the data folder


def test_resolve_explicit_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, "/nonexistent")
    assert resolve_data_dir(tmp_path) == tmp_path


def test_resolve_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


def test_resolve_none_means_hub():
    assert resolve_data_dir(None) is None


def test_resolve_missing_folder_rejected(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(DataError, match=f"data folder '{missing}'.*does not exist"):
        resolve_data_dir(missing)


def test_resolve_missing_env_folder_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(DataError, match=f"absent'.*{DATA_DIR_ENV}"):
        resolve_data_dir(None)


# Hub path, with datasets.load_dataset replaced so that nothing is downloaded


def test_hub_load_uses_hub_name(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["good", "meh", "bad"], "sentiment": [4, 2, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    frame = load_split("sentiment140", "test")
    assert calls == [("stanfordnlp/sentiment140", None, "test")]
    assert frame["label"].tolist() == [1, 0]


def test_hub_failure_rejected(monkeypatch):
    import datasets

    def failing_load_dataset(path, name=None, *, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError, match=f"'nyu-mll/glue'.*offline.*{DATA_DIR_ENV}"):
        load_split("sst2", "validation")


# iid partitioning


def test_iid_shards_cover_corpus_once(data_dir):
    corpus = load_split("sentiment140", "train", data_dir)
    combined = Counter()
    for partition_id in range(3):
        client = load_client_data("iid", partition_id, 3, datasets=["sentiment140"], data_dir=data_dir)
        combined += rows(client.train) + rows(client.test)
    assert combined == rows(corpus)


def test_iid_shard_sizes_add_up(data_dir):
    sizes = [
        len(load_client_data("iid", i, 4, datasets=["sentiment140"], data_dir=data_dir,
                             local_test_fraction=0.0).train)
        for i in range(4)
    ]
    assert sum(sizes) == 15_534
    assert max(sizes) - min(sizes) <= 1


def test_iid_shards_class_balanced(data_dir):
    # The file is sorted by label, so an unshuffled cut would give each shard one class.
    client = load_client_data("iid", 0, 2, datasets=["sentiment140"], data_dir=data_dir)
    assert 0.45 < client.train["label"].mean() < 0.55


def test_iid_same_seed_same_partition(data_dir):
    first = load_client_data("iid", 1, 3, datasets=["sentiment140"], data_dir=data_dir, seed=7)
    second = load_client_data("iid", 1, 3, datasets=["sentiment140"], data_dir=data_dir, seed=7)
    pd.testing.assert_frame_equal(first.train, second.train)
    pd.testing.assert_frame_equal(first.test, second.test)


def test_iid_other_seed_other_partition(data_dir):
    first = load_client_data("iid", 1, 3, datasets=["sentiment140"], data_dir=data_dir, seed=7)
    second = load_client_data("iid", 1, 3, datasets=["sentiment140"], data_dir=data_dir, seed=8)
    overlap = sum((rows(first.train) & rows(second.train)).values())
    # Two random thirds share about a third of their rows, far from all of them.
    assert overlap < 0.5 * len(first.train)


def test_iid_dataset_chooses_corpus(data_dir):
    client = load_client_data(
        "iid", 0, 2, datasets=["sst2", "sentiment140"], data_dir=data_dir, iid_dataset="sentiment140",
        max_train_examples=100,
    )
    assert (client.train["dataset"] == "sentiment140").all()


# per-dataset partitioning


def test_per_dataset_client_gets_own_dataset(data_dir):
    names = ["sst2", "imdb", "sentiment140"]
    for partition_id, name in enumerate(names):
        client = load_client_data(
            "per-dataset", partition_id, 3, datasets=names, data_dir=data_dir, max_train_examples=200
        )
        assert (client.train["dataset"] == name).all()
        assert (client.test["dataset"] == name).all()


def test_per_dataset_reads_only_own_file(data_dir, tmp_path):
    # The folder has no sst2 data at all, so touching it would raise.
    (tmp_path / "sentiment140").mkdir()
    (tmp_path / "sentiment140" / "train.parquet").symlink_to(data_dir / "sentiment140" / "train.parquet")
    client = load_client_data(
        "per-dataset", 1, 2, datasets=["sst2", "sentiment140"], data_dir=tmp_path, max_train_examples=50
    )
    assert len(client.train) + len(client.test) == 50


def test_local_split_keeps_every_row(data_dir):
    corpus = load_split("sentiment140", "train", data_dir)
    client = load_client_data("per-dataset", 0, 1, datasets=["sentiment140"], data_dir=data_dir)
    assert rows(client.train) + rows(client.test) == rows(corpus)


def test_cap_and_local_test_fraction(data_dir):
    client = load_client_data(
        "per-dataset", 0, 1, datasets=["imdb"], data_dir=data_dir, max_train_examples=1000,
        local_test_fraction=0.2,
    )
    assert len(client.train) == 800
    assert len(client.test) == 200


def test_cap_draws_both_classes(data_dir):
    client = load_client_data("per-dataset", 0, 1, datasets=["imdb"], data_dir=data_dir, max_train_examples=400)
    assert set(client.train["label"]) == {0, 1}


# Invalid partition requests


def test_empty_partition_rejected(tmp_path):
    write_parquet(tmp_path, "sst2", "train", pd.DataFrame({"sentence": ["a", "b", "c"], "label": [0, 1, 0]}))
    with pytest.raises(DataError, match=r"partition 3 of 5 .* is empty \(and 1 more\); use fewer partitions"):
        load_client_data("iid", 4, 5, datasets=["sst2"], data_dir=tmp_path)


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        pytest.param(("iid", 3, 3, ["sst2"]), "partition_id 3 is out of range", id="id-too-large"),
        pytest.param(("iid", -1, 3, ["sst2"]), "partition_id -1 is out of range", id="id-negative"),
        pytest.param(("shards", 0, 3, ["sst2"]), "unknown partitioning 'shards'", id="unknown-partitioning"),
        pytest.param(("per-dataset", 0, 3, ["sst2", "imdb"]), "num_partitions must be 2", id="count-mismatch"),
        pytest.param(("iid", 0, 0, ["sst2"]), "num_partitions must be a positive integer", id="zero-partitions"),
        pytest.param(("iid", 0, 2, "sst2"), r"write \['sst2'\]", id="string-not-list"),
        pytest.param(("iid", 0, 2, []), "datasets is empty", id="no-datasets"),
        pytest.param(("iid", 0, 2, ["sst2", "sst2"]), "listed twice", id="repeated-dataset"),
        pytest.param(("iid", 0, 2, ["yelp"]), "unknown data set 'yelp'", id="unknown-dataset"),
    ],
)
def test_invalid_request_rejected(data_dir, request_args, message):
    partitioning, partition_id, num_partitions, names = request_args
    with pytest.raises(DataError, match=message):
        load_client_data(partitioning, partition_id, num_partitions, datasets=names, data_dir=data_dir)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"local_test_fraction": 1.0}, "local_test_fraction must be in", id="fraction-one"),
        pytest.param({"max_train_examples": 0}, "max_train_examples must be a positive", id="zero-cap"),
        pytest.param({"iid_dataset": "yelp"}, "unknown iid_dataset 'yelp'", id="unknown-iid-dataset"),
    ],
)
def test_invalid_setting_rejected(data_dir, settings, message):
    with pytest.raises(DataError, match=message):
        load_client_data("iid", 0, 2, datasets=["sst2"], data_dir=data_dir, **settings)


# Global test sets


def test_global_test_uses_eval_splits(data_dir):
    tests = load_global_test(["sentiment140", "sst2"], data_dir)
    assert list(tests) == ["sentiment140", "sst2"]
    assert len(tests["sst2"]) == 872
    assert len(tests["sentiment140"]) == 359


def test_global_test_cap_is_seeded(data_dir):
    first = load_global_test(["imdb"], data_dir, max_examples_per_dataset=300, seed=1)["imdb"]
    second = load_global_test(["imdb"], data_dir, max_examples_per_dataset=300, seed=1)["imdb"]
    other = load_global_test(["imdb"], data_dir, max_examples_per_dataset=300, seed=2)["imdb"]
    assert len(first) == 300
    pd.testing.assert_frame_equal(first, second)
    assert first["text"].tolist() != other["text"].tolist()
