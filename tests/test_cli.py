"""The otfuse command line: argument checks, error output, helpers and the SuperLink lifecycle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from flwr.common.config import parse_config_args
from rich.console import Console

from otfuse.cli import run_command
from otfuse.cli.flower_env import OFFLINE_SWITCHES, RAY_BOOTSTRAP_CONFIG, offline_env
from otfuse.cli.main import build_parser, main
from otfuse.cli.report import accuracy_table
from otfuse.cli.processes import free_port, process_table
from otfuse.cli.superlink import LocalSuperLink

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_data_env(monkeypatch):
    monkeypatch.delenv("OTFUSE_DATA_DIR", raising=False)


def run_otfuse(capsys, *args: str) -> tuple[int, str]:
    """Call ``otfuse run`` in this process; return the exit status and stderr."""
    status = main(["run", *args])
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, error: str, *words: str) -> None:
    assert status != 0
    lines = error.strip().splitlines()
    assert len(lines) == 1, error
    assert lines[0].startswith("otfuse run: error: ")
    for word in words:
        assert word in lines[0]


def test_missing_data_folder(capsys, no_data_env, tmp_path):
    status, error = run_otfuse(capsys, "--data-dir", str(tmp_path / "absent"))

    assert_one_line_error(status, error, "does not exist", str(tmp_path / "absent"))


def test_no_data_folder_given(capsys, no_data_env):
    status, error = run_otfuse(capsys)

    assert_one_line_error(status, error, "--data-dir", "OTFUSE_DATA_DIR")


def test_unknown_dataset(capsys, data_dir):
    status, error = run_otfuse(capsys, "--data-dir", str(data_dir), "--run-config", "datasets='sst2,yelp'")

    assert_one_line_error(status, error, "'datasets'", "yelp", "'sentiment140'")


def test_unknown_strategy(capsys, data_dir):
    status, error = run_otfuse(capsys, "--data-dir", str(data_dir), "--strategy", "fedbanana")

    assert_one_line_error(status, error, "'strategy'", "'fedbanana'", "'otfusion', 'fedavg'")


def test_wrong_value_type(capsys, data_dir):
    status, error = run_otfuse(capsys, "--data-dir", str(data_dir), "--run-config", "batch-size='large'")

    assert_one_line_error(status, error, "'batch-size'", "'large'", "an integer")


def test_unquoted_string_value(capsys, data_dir):
    status, error = run_otfuse(capsys, "--data-dir", str(data_dir), "--run-config", "strategy=fedavg")

    assert_one_line_error(status, error, "invalid --run-config")


def test_run_config_without_equals(capsys, data_dir):
    status, error = run_otfuse(capsys, "--data-dir", str(data_dir), "--run-config", "fedavg")

    assert_one_line_error(status, error, "KEY=VALUE")


def test_too_few_clients_for_minimum(capsys, data_dir):
    status, error = run_otfuse(capsys, "--data-dir", str(data_dir), "--num-clients", "1")

    assert_one_line_error(status, error, "'min-available-nodes'", "wait forever")


def test_more_replies_than_clients(capsys, data_dir):
    status, error = run_otfuse(
        capsys, "--data-dir", str(data_dir), "--num-clients", "3", "--run-config", "min-train-replies=4"
    )

    assert_one_line_error(status, error, "'min-train-replies' is 4", "every round would be skipped")


def test_per_dataset_client_count_mismatch(capsys, data_dir):
    status, error = run_otfuse(capsys, "--data-dir", str(data_dir), "--num-clients", "4")

    assert_one_line_error(status, error, "num_partitions must be 3")


def test_missing_column(capsys, tmp_path):
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    frame = pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]})
    frame.to_parquet(sst2 / "train.parquet")
    frame.to_parquet(sst2 / "validation.parquet")

    status, error = run_otfuse(
        capsys, "--data-dir", str(tmp_path), "--run-config", "datasets='sst2' partitioning='iid'"
    )

    assert_one_line_error(status, error, "sentence")


def test_error_exit_without_traceback(no_data_env, tmp_path):
    absent = tmp_path / "absent"
    completed = subprocess.run(
        [sys.executable, "-m", "otfuse.cli.main", "run", "--data-dir", str(absent)],
        capture_output=True, text=True, timeout=120, check=False,
    )

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().count("\n") == 0, completed.stderr
    assert str(absent) in completed.stderr


def test_parser_lists_subcommands():
    help_text = build_parser().format_help()

    for command in ("run", "fuse", "bench"):
        assert command in help_text


def test_plan_merges_options(data_dir, tmp_path):
    args = build_parser().parse_args(
        ["run", "--data-dir", str(data_dir), "--strategy", "fedavg", "--rounds", "2",
         "--output-dir", str(tmp_path / "out"), "--run-config", "model.d-model=32 model.n-heads=2"]
    )

    plan = run_command.plan_run(args)

    assert plan.values["strategy"] == "fedavg"
    assert plan.values["num-server-rounds"] == 2
    assert plan.values["model.d-model"] == 32
    assert plan.values["model.n-heads"] == 2
    assert plan.values["data-dir"] == str(data_dir.resolve())
    assert plan.output_dir == tmp_path / "out"
    assert plan.values["output-dir"] == str(tmp_path / "out")
    assert plan.num_clients == 3
    assert plan.app_dir == REPOSITORY


def test_existing_metrics_rejected(data_dir, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    args = build_parser().parse_args(["run", "--data-dir", str(data_dir), "--output-dir", str(tmp_path)])

    with pytest.raises(run_command.CommandError, match="already contains metrics.jsonl"):
        run_command.plan_run(args)


def test_run_config_lines_merge_nested_keys():
    values = run_command.parse_run_config_args(["model.d-model=32", "model.n-heads=2 fusion.reg=0.1"])

    assert values == {"model.d-model": 32, "model.n-heads": 2, "fusion.reg": 0.1}


def test_run_config_file_round_trip(tmp_path):
    values = {"strategy": "fedavg", "model.d-model": 32, "data-dir": "/data with space/it's", "fusion.reg": 0.1}

    path = run_command._write_run_config(tmp_path, values)

    assert parse_config_args([str(path)]) == values


def test_accuracy_table_lists_rounds():
    records = [
        {"round": 1, "datasets": {"sst2": {"accuracy": 0.61}}, "overall": {"accuracy": 0.6}, "fusion_seconds": 0.5},
        {"round": 0, "datasets": {"sst2": {"accuracy": 0.5}}, "overall": {"accuracy": 0.5}, "fusion_seconds": None},
    ]
    console = Console(record=True, width=120)

    console.print(accuracy_table(records, title="accuracy"))
    text = console.export_text()

    assert "sst2" in text
    assert "0.610" in text
    assert "0.50" in text
    assert text.index("0.500") < text.index("0.610")


def test_offline_env_switches(tmp_path):
    env = offline_env(tmp_path / "state", base={"PATH": "/usr/bin"}, superlink_port=40001, control_port=40002)

    for key, value in OFFLINE_SWITCHES.items():
        assert env[key] == value
    assert env["PATH"] == "/usr/bin"
    assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == "40001"
    assert env["FLWR_LOCAL_CONTROL_API_PORT"] == "40002"
    assert Path(env["FLWR_HOME"]).is_dir()
    assert (Path(env["HOME"]) / RAY_BOOTSTRAP_CONFIG).read_text().strip() == "{}"


def test_superlink_starts_and_stops(tmp_path):
    env = offline_env(tmp_path / "state")
    superlink = LocalSuperLink(
        env=env, port=free_port(), control_port=free_port(), log_path=tmp_path / "superlink.log", cwd=tmp_path
    )

    with superlink:
        pid = superlink.process.pid
        assert superlink.is_healthy()
        assert pid in process_table()

    assert not superlink.is_healthy()
    assert pid not in process_table()
    remaining = [p for p, (_, group) in process_table().items() if group == pid]
    assert remaining == []


def test_find_app_dir_default():
    assert run_command.find_app_dir(None) == REPOSITORY


def test_find_app_dir_rejects_folder(tmp_path):
    with pytest.raises(run_command.CommandError, match="no Flower app"):
        run_command.find_app_dir(str(tmp_path))


# pathspec deprecates the pattern class that flwr 1.42 uses to read .gitignore.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")
def test_fab_contains_only_package():
    # flwr run builds this bundle from the checkout, which also contains the virtual environment.
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPOSITORY))).namelist()

    assert "otfuse/server/app.py" in names
    assert "otfuse/client/app.py" in names
    assert "pyproject.toml" in names
    outside = [name for name in names if not name.startswith("otfuse/")]
    assert sorted(outside) == [".info/CONTENT", "README.md", "pyproject.toml"]
