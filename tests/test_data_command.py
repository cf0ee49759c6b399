"""Tests of the partition summaries and the ``otfuse data describe`` command."""

import argparse

import pandas as pd
import pytest

from otfuse.cli import data_command
from otfuse.cli.errors import CommandError
from otfuse.data_partitions import (
    DATA_DIR_ENV,
    EMOTION_LABELS,
    ClientData,
    load_split,
    partition_summary,
    token_count_summary,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def parse(argv):
    parser = argparse.ArgumentParser()
    data_command.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def describe(argv, data_dir, out):
    args = parse(["data", "describe", *argv, "--data-dir", str(data_dir), "--out", str(out)])
    return args.handler(args)


# Summaries


def test_partition_summary_counts():
    train = pd.DataFrame({"text": ["a b", "c", "d e f"], "label": [0, 2, 2], "language": ["fi"] * 3})
    summary = partition_summary([ClientData(train=train, test=train.iloc[:1])], EMOTION_LABELS)
    row = summary.iloc[0]
    assert (row["train"], row["test"], row["languages"]) == (3, 1, "fi")
    assert (row["anger"], row["disgust"], row["trust"]) == (1, 2, 0)
    assert row["mean_tokens"] == pytest.approx(2.0)


def test_partition_summary_multi_label_counts():
    train = pd.DataFrame({"text": ["a", "b"], "label": [(1, 0, 1), (0, 0, 1)], "language": ["en", "en"]})
    summary = partition_summary([ClientData(train=train, test=train.iloc[:0])], ("x", "y", "z"))
    assert summary.loc[0, ["x", "y", "z"]].tolist() == [1, 0, 2]


def test_token_count_summary(data_dir):
    frames = {name: load_split(name, "train", data_dir) for name in ("xed-en", "xed-fi")}
    summary = token_count_summary(frames).set_index("name")
    # Finnish packs more into a word (cases, clitics), so its sentences have fewer words.
    assert summary.loc["xed-fi", "mean"] < summary.loc["xed-en", "mean"]
    assert summary.loc["xed-en", "texts"] == len(frames["xed-en"])


# The command


def test_describe_writes_chart(data_dir, tmp_path, capsys):
    argv = ["--partitioning", "dirichlet", "--num-partitions", "3", "--datasets", "xed-en", "--alpha", "0.5"]
    assert describe(argv, data_dir, tmp_path) == 0
    chart = tmp_path / "labels-dirichlet-3.png"
    assert chart.read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert "anticipation" in printed
    assert "dirichlet partitioning, 3 nodes" in printed


def test_describe_prints_each_node(data_dir, tmp_path, capsys):
    argv = ["--partitioning", "per-language", "--num-partitions", "3", "--datasets", "xed-en", "xed-fi",
            "--task", "multi-label", "--max-train-examples", "100"]
    assert describe(argv, data_dir, tmp_path) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(" en " in line for line in lines) == 2
    assert sum(" fi " in line for line in lines) == 1


def test_describe_error_is_command_error(data_dir, tmp_path):
    argv = ["--partitioning", "dirichlet", "--num-partitions", "60", "--datasets", "xed-fi", "--alpha", "0.01"]
    with pytest.raises(CommandError, match="larger alpha"):
        describe(argv, data_dir, tmp_path)
