"""The strategy benchmark: matrix, per-run summaries, leaderboards, resuming, and a tiny end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import otfuse.cli.run_command as run_command
from otfuse.bench import strategies as bench
from otfuse.bench.federated import finished_run, run_config_values, run_one
from otfuse.bench.report import Column, leaderboard_table
from otfuse.server.outputs import METRICS_FILE, MODEL_FILE, RUN_CONFIG_FILE

TINY_SIZE = bench.MatrixSize(
    seeds=(0,), rounds=2, max_train_examples=100, max_test_examples=100, epochs=1, batch_size=32, lr=3e-3,
    model={"vocab_size": 512, "max_len": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32},
)
IID = replace(next(case for case in bench.CASES if case.name == "iid"), num_clients=2, target_accuracy=0.5)
TINY_MATRIX = bench.Matrix(cases=(IID,), strategies=("fedavg", "otfusion-hard"), size=TINY_SIZE)


# Matrix


def test_default_matrix_covers_issue_grid():
    matrix = bench.build_matrix()

    assert [case.name for case in matrix.cases] == ["iid", "dirichlet-0.1", "dirichlet-1.0", "per-dataset", "per-language"]
    assert {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg",
            "otfusion-hard", "otfusion-soft"} <= set(matrix.strategies)
    assert len(matrix.size.seeds) >= 3
    assert matrix.num_runs == len(matrix.cases) * len(matrix.strategies) * len(matrix.size.seeds)


def test_quick_matrix_is_smaller():
    quick, default = bench.build_matrix(quick=True), bench.build_matrix()

    assert quick.num_runs < default.num_runs / 10
    assert quick.size.rounds <= default.size.rounds


def test_matrix_overrides_apply():
    matrix = bench.build_matrix(seeds=[4, 5], strategies=["fedmedian"], cases=["per-language"], rounds=7)

    assert matrix.size.seeds == (4, 5)
    assert matrix.strategies == ("fedmedian",)
    assert [case.name for case in matrix.cases] == ["per-language"]
    assert matrix.size.rounds == 7


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"strategies": ["scaffold"]}, "unknown strategy 'scaffold'", id="strategy"),
        pytest.param({"cases": ["pathological"]}, "unknown partition case 'pathological'", id="case"),
        pytest.param({"seeds": []}, "seeds is empty", id="no-seeds"),
        pytest.param({"rounds": 0}, "rounds must be at least 1", id="zero-rounds"),
    ],
)
def test_invalid_matrix_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        bench.build_matrix(**overrides)


def test_case_settings_reach_run_config():
    dirichlet = next(case for case in bench.CASES if case.name == "dirichlet-0.1")
    xed = next(case for case in bench.CASES if case.name == "per-language")

    values = run_config_values(bench.experiment_config(dirichlet, bench.DEFAULT_SIZE, ["fedprox"]), "fedprox", 3)
    xed_values = run_config_values(bench.experiment_config(xed, bench.DEFAULT_SIZE, ["fedavg"]), "fedavg", 0)

    assert values["partitioning"] == "dirichlet"
    assert values["dirichlet-alpha"] == 0.1
    assert values["strategy"] == "fedprox"
    assert values["seed"] == 3
    assert values["min-available-nodes"] == dirichlet.num_clients
    assert xed_values["datasets"] == "xed-en,xed-fi"
    assert xed_values["partitioning"] == "per-language"


# Per-run summaries and leaderboards


def round_rows(partitioning: str, strategy: str, seed: int, accuracies: list[float],
               aggregation: float) -> list[dict]:
    rows = []
    for round_number, accuracy in enumerate(accuracies):
        first = round_number == 0
        rows.append({
            "partitioning": partitioning, "strategy": strategy, "seed": seed, "round": round_number,
            "test_set": "overall", "accuracy": accuracy, "f1_weighted": accuracy - 0.1, "loss": 0.7,
            "ece": 0.1 if strategy == "fedavg" else 0.05, "fusion_seconds": None,
            "aggregation_seconds": None if first else aggregation, "mb_sent_per_round": 0.0 if first else 2.0,
            "client_train_seconds": None if first else 1.0, "round_seconds": None if first else 3.0,
            "client_epochs_per_round": 0 if first else 1,
        })
    return rows


@pytest.fixture
def hand_made_rounds(tmp_path) -> pd.DataFrame:
    """Two strategies and two seeds, written to CSV and read back like a finished benchmark."""
    rows = []
    rows += round_rows("iid", "fedavg", 0, [0.5, 0.6, 0.7], aggregation=0.01)
    rows += round_rows("iid", "fedavg", 1, [0.5, 0.62, 0.72], aggregation=0.03)
    rows += round_rows("iid", "otfusion-hard", 0, [0.5, 0.55, 0.68], aggregation=0.5)
    rows += round_rows("iid", "otfusion-hard", 1, [0.5, 0.52, 0.64], aggregation=0.9)
    path = tmp_path / "rounds.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return pd.read_csv(path)


def test_run_summary_values(hand_made_rounds):
    runs = bench.run_summaries(hand_made_rounds, [replace(IID, target_accuracy=0.65)]).set_index(["strategy", "seed"])

    assert runs.loc[("fedavg", 0), "accuracy"] == pytest.approx(0.7)
    assert runs.loc[("fedavg", 0), "rounds_to_target"] == 2
    assert runs.loc[("otfusion-hard", 0), "rounds_to_target"] == 2
    assert np.isnan(runs.loc[("otfusion-hard", 1), "rounds_to_target"])
    assert runs.loc[("otfusion-hard", 0), "aggregation_ratio"] == pytest.approx(50.0)
    assert runs.loc[("otfusion-hard", 1), "aggregation_ratio"] == pytest.approx(30.0)
    assert runs.loc[("fedavg", 1), "aggregation_ratio"] == pytest.approx(1.0)
    assert runs.loc[("fedavg", 0), "mb_per_round"] == pytest.approx(2.0)


def test_leaderboard_marks_best_per_column(hand_made_rounds):
    runs = bench.run_summaries(hand_made_rounds, [replace(IID, target_accuracy=0.65)])
    summary = bench.summarise_runs(runs)

    table = leaderboard_table(summary, "strategy", bench.LEADERBOARD_COLUMNS, count_column="accuracy_count",
                              extra={"reached": "reached"})
    header, _, fedavg, otfusion = table.splitlines()
    fedavg_cells = [cell.strip() for cell in fedavg.strip("|").split("|")]
    otfusion_cells = [cell.strip() for cell in otfusion.strip("|").split("|")]
    titles = [cell.strip() for cell in header.strip("|").split("|")]

    def cell(cells, title):
        return cells[titles.index(title)]

    assert cell(fedavg_cells, "accuracy") == "**0.710 ± 0.014**"
    assert cell(otfusion_cells, "accuracy") == "0.660 ± 0.028"
    # Lower is better for ECE and aggregation time.
    assert cell(otfusion_cells, "ECE") == "**0.050 ± 0.000**"
    assert cell(fedavg_cells, "ECE") == "0.100 ± 0.000"
    assert cell(fedavg_cells, "aggregation s").startswith("**0.0200")
    assert not cell(otfusion_cells, "aggregation s").startswith("**")
    assert cell(otfusion_cells, "aggregation / FedAvg") == "40.0 ± 14.1"
    # One seed of otfusion-hard missed the target, so it gets no mean and fedavg is best.
    assert cell(fedavg_cells, "rounds to target") == "**2.0 ± 0.0**"
    assert cell(otfusion_cells, "rounds to target") == "–"
    assert cell(otfusion_cells, "reached") == "1/2"
    # Equal values are all best.
    assert cell(fedavg_cells, "MB per round") == cell(otfusion_cells, "MB per round") == "**2.00 ± 0.00**"
    assert cell(fedavg_cells, "seeds") == "2"


def test_leaderboard_skips_missing_values():
    summary = pd.DataFrame({
        "strategy": ["a", "b"], "score_mean": [np.nan, 0.4], "score_std": [np.nan, np.nan],
    })

    table = leaderboard_table(summary, "strategy", [Column("score", "score")])

    assert "| a | – |" in table
    assert "| b | **0.400 ± 0.000** |" in table


def test_accuracy_overview_one_column_per_partitioning(hand_made_rounds):
    other = hand_made_rounds.assign(partitioning="dirichlet-0.1", accuracy=hand_made_rounds["accuracy"][::-1].values)
    rounds = pd.concat([hand_made_rounds, other])
    cases = [IID, next(case for case in bench.CASES if case.name == "dirichlet-0.1")]
    summary = bench.summarise_runs(bench.run_summaries(rounds, cases))

    table = bench.accuracy_overview(summary, cases)

    assert table.splitlines()[0] == "| strategy | iid | dirichlet-0.1 |"
    assert "| fedavg | **0.710 ± 0.014** |" in table


# Resuming


def write_run(folder: Path, values: dict, rounds: int, model: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / RUN_CONFIG_FILE).write_text(json.dumps(values), encoding="utf-8")
    lines = [json.dumps({"round": number, "overall": {"accuracy": 0.5}, "datasets": {}}) for number in range(rounds + 1)]
    (folder / METRICS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if model:
        (folder / MODEL_FILE).write_bytes(b"")


def tiny_values(seed: int = 0) -> dict:
    return run_config_values(bench.experiment_config(IID, TINY_SIZE, ["fedavg"]), "fedavg", seed)


def test_finished_run_needs_every_round(tmp_path):
    values = tiny_values()
    write_run(tmp_path / "complete", values, rounds=2)
    write_run(tmp_path / "crashed", values, rounds=1)
    write_run(tmp_path / "no-model", values, rounds=2, model=False)

    assert finished_run(tmp_path / "complete", values)
    assert not finished_run(tmp_path / "crashed", values)
    assert not finished_run(tmp_path / "no-model", values)
    assert not finished_run(tmp_path / "missing", values)


def test_finished_run_with_other_settings(tmp_path):
    write_run(tmp_path / "run", tiny_values(seed=0), rounds=2)

    assert not finished_run(tmp_path / "run", tiny_values(seed=1))


class RecordingRuns:
    """Replaces plan_run and execute of ``otfuse run``, recording which output folders run."""

    def __init__(self, monkeypatch) -> None:
        self.planned: list[Path] = []
        monkeypatch.setattr(run_command, "plan_run", self.plan_run)
        monkeypatch.setattr(run_command, "execute", self.execute)

    def plan_run(self, args):
        output_dir = Path(args.output_dir)
        assert not output_dir.exists(), "a half-finished folder must be gone before the run starts"
        self.planned.append(output_dir)
        return args

    def execute(self, plan, console):
        return [{"round": 0, "overall": {"accuracy": 0.5}}]


def test_run_one_reruns_half_finished_folder(tmp_path, monkeypatch):
    runs = RecordingRuns(monkeypatch)
    config = bench.experiment_config(IID, TINY_SIZE, ["fedavg"])
    folder = tmp_path / "federated" / "fedavg-seed0"
    write_run(folder, tiny_values(), rounds=1)
    (folder / "stale.txt").write_text("left by a crash", encoding="utf-8")

    run_one(config, "fedavg", 0, tmp_path)

    assert runs.planned == [folder]


def test_run_one_reads_finished_folder(tmp_path, monkeypatch):
    runs = RecordingRuns(monkeypatch)
    config = bench.experiment_config(IID, TINY_SIZE, ["fedavg"])
    write_run(tmp_path / "federated" / "fedavg-seed0", tiny_values(), rounds=2)

    records = run_one(config, "fedavg", 0, tmp_path)

    assert runs.planned == []
    assert [record["round"] for record in records] == [0, 1, 2]


# End to end


def report_without_header(path: Path) -> str:
    return "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("Command:"))


@pytest.mark.slow
def test_tiny_matrix_end_to_end_and_resume(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    started = []

    # Two child processes at once; the second invocation below reads their runs one at a time.
    result = bench.run_matrix(TINY_MATRIX, out, data_dir, show_progress=False, jobs=2,
                              on_run=lambda case, strategy, seed: started.append(strategy))
    report = bench.write_outputs(TINY_MATRIX, result, out, command="otfuse bench strategies (test)")
    rounds = result.rounds

    assert started == ["fedavg", "otfusion-hard"]
    assert result.failures == []
    overall = rounds[rounds["test_set"] == "overall"]
    assert sorted(set(overall["round"])) == [0, 1, 2]
    federated = overall[overall["round"] > 0]
    assert (federated["aggregation_seconds"] > 0).all()
    assert (federated["mb_sent_per_round"] > 0).all()
    assert (federated["client_train_seconds"] > 0).all()
    for name in ("rounds.csv", "runs.csv", "results.md", "accuracy-iid.png", "aggregation-seconds.png"):
        assert (out / name).is_file(), name
    text = report.read_text(encoding="utf-8")
    assert "### iid" in text
    assert "| otfusion-hard |" in text
    first_report = report_without_header(report)
    first_rounds = (out / "rounds.csv").read_text(encoding="utf-8")

    # A second invocation reads both finished runs: starting a simulation would fail.
    def no_simulation(plan, console):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(run_command, "execute", no_simulation)
    again = bench.run_matrix(TINY_MATRIX, out, data_dir, show_progress=False)
    bench.write_outputs(TINY_MATRIX, again, out, command="otfuse bench strategies (test)")

    assert again.failures == []

    assert (out / "rounds.csv").read_text(encoding="utf-8") == first_rounds
    assert report_without_header(out / "results.md") == first_report


# Simulation overhead


def test_overhead_phases_add_up():
    from datetime import datetime, timedelta, timezone

    from otfuse.bench.overhead import run_times

    start = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    records = []
    for number, elapsed in enumerate([0.0, 20.0, 25.0, 30.0]):
        records.append({
            "round": number, "elapsed_seconds": elapsed,
            "time": (start + timedelta(seconds=10 + elapsed)).isoformat(timespec="seconds"),
            "client_train": [] if number == 0 else [{"train_seconds": 1.0}, {"train_seconds": 3.0}],
            "aggregation_seconds": None if number == 0 else 0.5,
            "evaluation_seconds": 0.25,
        })

    times = run_times("fedavg", records, start, command=50.0, parallel=2)

    assert times.startup == pytest.approx(10.0)
    assert times.first_round == pytest.approx(20.0)
    assert times.teardown == pytest.approx(10.0)
    assert times.round_wall == pytest.approx(5.0)
    assert times.round_training == pytest.approx(2.0)
    assert times.round_aggregation == pytest.approx(0.5)
    assert times.round_evaluation == pytest.approx(0.25)
    assert times.round_overhead == pytest.approx(2.25)


def test_failed_run_left_out_and_listed(tmp_path, monkeypatch):
    from otfuse.cli.errors import CommandError

    def fake_run_one(config, strategy, seed, out_dir, data_dir=None, ray_address=None):
        if strategy == "otfusion-hard":
            raise CommandError("run 7 ended with status 'finished:failed'")
        return [{"round": 0, "overall": {"accuracy": 0.5}, "datasets": {}},
                {"round": 1, "overall": {"accuracy": 0.6}, "datasets": {}}]

    monkeypatch.setattr(bench, "run_one", fake_run_one)

    result = bench.run_matrix(TINY_MATRIX, tmp_path, show_progress=False)
    report = bench.write_outputs(TINY_MATRIX, result, tmp_path, command="test")

    assert set(result.rounds["strategy"]) == {"fedavg"}
    assert result.failures == ["iid otfusion-hard seed 0: run 7 ended with status 'finished:failed'"]
    assert "1 runs failed and are left out" in report.read_text(encoding="utf-8")


def test_parallel_runs_keep_every_row(tmp_path, monkeypatch):
    import otfuse.bench.federated as federated
    from otfuse.cli.errors import CommandError

    def fake_process(config, strategy, seed, out_dir, data_dir=None, ray_address=None, on_start=None):
        if strategy == "fedprox":
            raise CommandError("otfuse run for fedprox seed 0 exited with code 1: failed")
        accuracy = {"fedavg": 0.6, "fedmedian": 0.55, "otfusion-hard": 0.7}[strategy]
        return [{"round": 0, "overall": {"accuracy": 0.5}, "datasets": {}},
                {"round": 1, "overall": {"accuracy": accuracy}, "datasets": {}}]

    monkeypatch.setattr(federated, "run_one_process", fake_process)
    matrix = replace(TINY_MATRIX, strategies=("fedavg", "fedprox", "fedmedian", "otfusion-hard"))

    result = bench.run_matrix(matrix, tmp_path, show_progress=False, jobs=3)

    final = result.rounds[result.rounds["round"] == 1].set_index("strategy")["accuracy"]
    assert final.to_dict() == {"fedavg": 0.6, "fedmedian": 0.55, "otfusion-hard": 0.7}
    assert result.failures == ["iid fedprox seed 0: otfuse run for fedprox seed 0 exited with code 1: failed"]


def test_parallel_signal_stops_matrix(tmp_path, monkeypatch):
    import otfuse.bench.federated as federated
    from otfuse.cli.errors import CommandError

    def terminated(*args, **kwargs):
        raise CommandError("otfuse run for fedavg seed 0 exited with code 143: terminated", exit_code=143)

    monkeypatch.setattr(federated, "run_one_process", terminated)

    with pytest.raises(CommandError, match="code 143"):
        bench.run_matrix(TINY_MATRIX, tmp_path, show_progress=False, jobs=2)


def test_zero_jobs_rejected(tmp_path):
    with pytest.raises(ValueError, match="jobs=0 is invalid"):
        bench.run_matrix(TINY_MATRIX, tmp_path, show_progress=False, jobs=0)


def test_repeated_failures_stop_matrix(tmp_path, monkeypatch):
    from otfuse.cli.errors import CommandError

    calls = []

    def broken(config, strategy, seed, *args, **kwargs):
        calls.append(strategy)
        raise CommandError("the local SuperLink exited with code 3 at start")

    monkeypatch.setattr(bench, "run_one", broken)
    matrix = replace(TINY_MATRIX, strategies=("fedavg", "fedprox", "fedmedian", "otfusion-hard"))

    with pytest.raises(CommandError, match="3 runs in a row failed, the last with: the local SuperLink"):
        bench.run_matrix(matrix, tmp_path, show_progress=False)

    assert calls == ["fedavg", "fedprox", "fedmedian"]


def test_signal_stops_matrix(tmp_path, monkeypatch):
    from otfuse.cli.errors import CommandError

    def terminated(*args, **kwargs):
        raise CommandError("terminated by SIGTERM", exit_code=143)

    monkeypatch.setattr(bench, "run_one", terminated)

    with pytest.raises(CommandError, match="SIGTERM"):
        bench.run_matrix(TINY_MATRIX, tmp_path, show_progress=False)
