"""Tests of the XED data sets: deduplication, the fixed held-out split and both label tasks."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from otfuse.data_partitions import (
    DATA_DIR_ENV,
    EMOTION_LABELS,
    EVAL_SPLIT,
    DataError,
    label_array,
    label_names,
    load_global_test,
    load_split,
)
from otfuse.data_partitions.xed import TEST_FRACTION, xed_sentences

XED = ["xed-en", "xed-fi"]
TASKS = ["single-label", "multi-label"]
# Rows per (data set, task, split), computed once from the offline data. They change only if
# the deduplication or split rule changes, which would change every XED result.
SPLIT_SIZES = {
    ("xed-en", "single-label"): (10_923, 2_729),
    ("xed-en", "multi-label"): (14_022, 3_504),
    ("xed-fi", "single-label"): (8_854, 2_214),
    ("xed-fi", "multi-label"): (11_559, 2_890),
}


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def raw_xed(data_dir) -> pd.DataFrame:
    """The shared file as stored, read without the loader."""
    return pd.read_parquet(data_dir / "xed" / "train.parquet")


def write_xed(folder, rows):
    """Write a small XED file of (sentence, labels, language) rows."""
    frame = pd.DataFrame(rows, columns=["sentence", "labels", "language"])
    (folder / "xed").mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "xed" / "train.parquet")


# The held-out split


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", XED)
def test_split_sizes_pinned(data_dir, name, task):
    train = load_split(name, "train", data_dir, task=task)
    test = load_split(name, "test", data_dir, task=task)
    assert (len(train), len(test)) == SPLIT_SIZES[(name, task)]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", XED)
def test_split_parts_disjoint(data_dir, name, task):
    train = set(load_split(name, "train", data_dir, task=task)["text"])
    test = set(load_split(name, "test", data_dir, task=task)["text"])
    assert not train & test


def test_split_disjoint_across_languages(data_dir):
    sentences = xed_sentences(data_dir)
    parts_per_text = sentences.groupby("text")["split"].nunique()
    assert (parts_per_text == 1).all()


@pytest.mark.parametrize("split", ["train", "test"])
def test_split_has_both_languages(data_dir, split):
    sentences = xed_sentences(data_dir)
    assert set(sentences.loc[sentences["split"] == split, "language"]) == {"en", "fi"}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", XED)
def test_split_deduplicated(data_dir, name, split, task):
    frame = load_split(name, split, data_dir, task=task)
    assert not frame["text"].duplicated().any()


def test_split_stratified(data_dir):
    sentences = xed_sentences(data_dir)
    counts = sentences.groupby(["language", "stratum"])["split"].value_counts().unstack()
    expected = (counts.sum(axis=1) * TEST_FRACTION).round()
    # Moving strings that occur in both languages to train may take a few rows off a stratum.
    assert ((counts["test"] - expected).abs() <= 3).all()


def test_split_independent_of_row_order(tmp_path, data_dir, raw_xed):
    reversed_rows = raw_xed.iloc[::-1][["sentence", "labels", "language"]]
    write_xed(tmp_path, reversed_rows.itertuples(index=False))
    original = load_split("xed-fi", "test", data_dir)
    shuffled = load_split("xed-fi", "test", tmp_path)
    assert Counter(zip(original["text"], original["label"])) == Counter(zip(shuffled["text"], shuffled["label"]))


def test_eval_split_is_test():
    assert EVAL_SPLIT["xed-en"] == "test"
    assert EVAL_SPLIT["xed-fi"] == "test"


def test_global_test_loads_xed(data_dir):
    tests = load_global_test(XED, data_dir, task="multi-label")
    assert len(tests["xed-en"]) == SPLIT_SIZES[("xed-en", "multi-label")][1]
    assert len(tests["xed-fi"]) == SPLIT_SIZES[("xed-fi", "multi-label")][1]


# Label mapping


def test_label_names_are_emotions():
    assert label_names("xed-fi") == EMOTION_LABELS
    assert EMOTION_LABELS[0] == "anger"
    assert EMOTION_LABELS[7] == "trust"


@pytest.mark.parametrize("name", XED)
def test_single_label_schema(data_dir, name):
    frame = load_split(name, "train", data_dir)
    assert list(frame.columns) == ["text", "label", "dataset", "language"]
    assert frame["label"].dtype == "int64"
    assert set(frame["label"]) == set(range(8))
    assert (frame["language"] == name[-2:]).all()


@pytest.mark.parametrize("name", XED)
def test_multi_label_schema(data_dir, name):
    labels = label_array(load_split(name, "train", data_dir, task="multi-label"))
    assert labels.dtype == np.float32
    assert labels.shape[1] == 8
    assert (labels.sum(axis=1) >= 1).all()
    assert (labels.sum(axis=1) > 1).any()


def test_single_label_keeps_source_id(data_dir, raw_xed):
    single = raw_xed[(raw_xed["config"] == "en_annotated") & (raw_xed["labels"].map(len) == 1)]
    sentence, source_id = single["sentence"].iloc[0], int(single["labels"].iloc[0][0])
    frame = pd.concat([load_split("xed-en", split, data_dir) for split in ("train", "test")])
    assert frame.loc[frame["text"] == sentence.strip(), "label"].tolist() == [source_id]


def test_multi_label_keeps_source_ids(data_dir, raw_xed):
    several = raw_xed[(raw_xed["config"] == "fi_annotated") & (raw_xed["labels"].map(len) == 3)]
    sentence, source_ids = several["sentence"].iloc[0], sorted(int(i) for i in several["labels"].iloc[0])
    frame = pd.concat([load_split("xed-fi", split, data_dir, task="multi-label") for split in ("train", "test")])
    (multi_hot,) = frame.loc[frame["text"] == sentence.strip(), "label"].tolist()
    assert [i for i, present in enumerate(multi_hot) if present] == source_ids


def test_neutral_excluded(data_dir, raw_xed):
    neutral_only = set(raw_xed.loc[raw_xed["config"] == "en_neutral", "sentence"].str.strip())
    neutral_only -= set(raw_xed.loc[raw_xed["config"] == "en_annotated", "sentence"].str.strip())
    for task in TASKS:
        frame = pd.concat([load_split("xed-en", split, data_dir, task=task) for split in ("train", "test")])
        assert not neutral_only & set(frame["text"])


# Deduplication rules, on small files


def test_duplicates_merge_emotions(tmp_path):
    write_xed(tmp_path, [
        ("Voi ei!", [3], "fi"),
        ("Voi ei!", [5], "fi"),
        ("Voi ei!", [8], "fi"),
        ("Hyvä.", [4], "fi"),
    ])
    frame = load_split("xed-fi", "train", tmp_path, task="multi-label")
    labels = dict(zip(frame["text"], frame["label"]))
    assert labels["Voi ei!"] == (0, 0, 0, 1, 0, 1, 0, 0)


def test_emotion_wins_over_neutral(tmp_path):
    write_xed(tmp_path, [("Aamen.", [8], "fi"), ("Aamen.", [7], "fi")])
    frame = load_split("xed-fi", "train", tmp_path)
    assert frame["label"].tolist() == [7]


def test_surrounding_space_deduplicated(tmp_path):
    write_xed(tmp_path, [("OK. ", [4], "en"), (" OK.", [4], "en")])
    frame = load_split("xed-en", "train", tmp_path)
    assert frame["text"].tolist() == ["OK."]


def test_languages_kept_apart(tmp_path):
    write_xed(tmp_path, [("Bingo.", [4], "en"), ("Bingo.", [6], "fi")])
    assert load_split("xed-en", "train", tmp_path)["label"].tolist() == [4]
    assert load_split("xed-fi", "train", tmp_path)["label"].tolist() == [6]


# Errors


def test_missing_file_rejected(tmp_path):
    (tmp_path / "xed").mkdir()
    with pytest.raises(DataError, match=r"xed/train\.parquet' not found"):
        load_split("xed-en", "train", tmp_path)


def test_missing_column_rejected(tmp_path):
    (tmp_path / "xed").mkdir()
    pd.DataFrame({"sentence": ["Hi."], "labels": [[4]]}).to_parquet(tmp_path / "xed" / "train.parquet")
    with pytest.raises(DataError, match="has no column 'language'"):
        load_split("xed-en", "train", tmp_path)


def test_unknown_language_in_file_rejected(tmp_path):
    write_xed(tmp_path, [("Hej.", [4], "sv")])
    with pytest.raises(DataError, match=r"unknown languages \['sv'\]"):
        load_split("xed-en", "train", tmp_path)


def test_unknown_label_id_rejected(tmp_path):
    write_xed(tmp_path, [("Hi.", [9], "en")])
    with pytest.raises(DataError, match=r"label ids \[9\]"):
        load_split("xed-en", "train", tmp_path)


def test_unknown_split_rejected(data_dir):
    with pytest.raises(DataError, match="unknown split 'validation' of data set 'xed-en'"):
        load_split("xed-en", "validation", data_dir)


def test_multi_label_sentiment_rejected(data_dir):
    with pytest.raises(DataError, match="supports only task 'single-label'"):
        load_split("sst2", "train", data_dir, task="multi-label")


def test_unknown_task_rejected(data_dir):
    with pytest.raises(DataError, match="unknown task 'regression'"):
        load_split("xed-en", "train", data_dir, task="regression")


# Hub path, with datasets.load_dataset replaced so that nothing is downloaded


def test_hub_configs_combined(monkeypatch):
    import datasets

    from otfuse.data_partitions import xed

    configs = {
        "en_annotated": {"sentence": ["Run!", "Great."], "labels": [[3, 6], [4]]},
        "en_neutral": {"sentence": ["The door."], "labels": [0]},
        "fi_annotated": {"sentence": ["Juokse!"], "labels": [[3]]},
        "fi_neutral": {"sentence": ["Ovi."], "labels": [0]},
    }
    calls = []

    def fake_load_dataset(path, name=None, *, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(configs[name])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    xed._hub_sentences.cache_clear()
    try:
        frame = pd.concat([load_split("xed-en", split, task="multi-label") for split in ("train", "test")])
    finally:
        xed._hub_sentences.cache_clear()
    assert sorted(calls) == sorted(("Helsinki-NLP/xed_en_fi", name, "train") for name in configs)
    assert sorted(frame["text"]) == ["Great.", "Run!"]
