"""The experiment runner: configs, one-shot runs at a tiny size, tables and determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from otfuse.bench.config import ExperimentConfigError, available_experiments, load_experiment
from otfuse.bench.oneshot import CENTRALISED, ENSEMBLE, OVERALL, run_seed
from otfuse.bench.report import markdown_table, summarise
from otfuse.bench.runner import run_experiment, tiny_overrides
from otfuse.metrics import expected_calibration_error


def tiny(name: str, **overrides):
    config = load_experiment(name)
    return config.with_overrides(**{**tiny_overrides(config), **overrides})


@pytest.mark.parametrize("name", available_experiments())
def test_pinned_config_loads(name):
    config = load_experiment(name)
    assert config.name == name
    assert len(config.seeds) >= 3


def test_unknown_experiment_lists_choices():
    with pytest.raises(ExperimentConfigError) as raised:
        load_experiment("nonexistent")
    assert "seeds" in str(raised.value)


def test_unknown_override_rejected():
    with pytest.raises(ExperimentConfigError) as raised:
        load_experiment("seeds").with_overrides(epoch=3)
    assert "'epoch'" in str(raised.value)


def test_seed_result_scores_every_model(data_dir):
    config = tiny("datasets")
    result = run_seed(config, 0, data_dir)
    frame = pd.DataFrame(result.rows)
    models = set(frame["model"])
    assert {"parent-0", "parent-1", "parent-2", CENTRALISED, ENSEMBLE, "vanilla", "ot-hard", "ot-soft"} <= models
    assert "ot-hard+finetuned" in models
    assert set(frame["test_set"]) == {"imdb", "sst2", "sentiment140", OVERALL}
    assert frame["accuracy"].between(0, 1).all()


def test_identical_seeds_give_identical_numbers(data_dir):
    config = tiny("seeds", seeds=(0,))
    first = pd.DataFrame(run_seed(config, 0, data_dir).rows).drop(columns=["seconds"])
    second = pd.DataFrame(run_seed(config, 0, data_dir).rows).drop(columns=["seconds"])
    pd.testing.assert_frame_equal(first, second)


def test_oneshot_report_files(data_dir, tmp_path):
    config = tiny("seeds")
    report = run_experiment(config, tmp_path, data_dir=data_dir, modes=("oneshot",), show_progress=False)
    text = report.read_text()
    assert "| model | accuracy | f1_weighted | ece | seeds |" in text
    assert (tmp_path / "oneshot.csv").is_file()
    assert (tmp_path / "oneshot_accuracy.png").stat().st_size > 0
    assert (tmp_path / "oneshot_reliability.png").stat().st_size > 0


def test_table_has_promised_columns_and_marks_best():
    rows = pd.DataFrame([
        {"seed": s, "model": m, "test_set": "sst2", "accuracy": a, "f1_weighted": a, "ece": e}
        for s in (0, 1) for m, a, e in (("a", 0.6, 0.10), ("b", 0.7, 0.20))
    ])
    table = markdown_table(summarise(rows), "sst2")
    lines = table.splitlines()
    assert lines[0] == "| model | accuracy | f1_weighted | ece | seeds |"
    assert "**0.700 ± 0.000**" in lines[3]
    assert "**0.100 ± 0.000**" in lines[2]


def test_perfectly_calibrated_predictor_has_small_ece():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 200_000)
    correct = rng.uniform(size=confidence.size) < confidence
    labels = np.where(correct, 1, 0)
    probabilities = np.stack([1 - confidence, confidence], axis=1)
    assert expected_calibration_error(probabilities, labels) < 0.01


@pytest.mark.parametrize("name", [name for name in available_experiments() if name != "seeds"])
def test_experiment_oneshot_tiny(name, data_dir, tmp_path):
    # The seeds experiment has its own report test above.
    config = tiny(name, seeds=(0,))

    report = run_experiment(config, tmp_path, data_dir=data_dir, modes=("oneshot",), show_progress=False)

    rows = pd.read_csv(tmp_path / "oneshot.csv")
    assert set(config.variants) <= set(rows["model"])
    assert rows["accuracy"].between(0, 1).all()
    assert "## One-shot fusion" in report.read_text()


@pytest.mark.slow
def test_experiment_federated_tiny(data_dir, tmp_path):
    # One experiment in federated mode: every experiment shares this path, and XED per
    # language is the partitioning that the strategy benchmark's quick matrix leaves out.
    config = tiny("multilingual", seeds=(0,))

    report = run_experiment(config, tmp_path, data_dir=data_dir, modes=("federated",), show_progress=False)

    text = report.read_text()
    assert "fedavg" in text
    assert "otfusion-hard" in text
    for strategy in config.federated["strategies"]:
        assert (tmp_path / "federated" / f"{strategy}-seed0" / "model.safetensors").is_file()


def test_federated_section_states_run_config_epochs(tmp_path, monkeypatch):
    import otfuse.bench.federated as federated

    def fake_run_one(config, strategy, seed, out_dir, data_dir=None):
        return [{"round": number, "overall": {"accuracy": 0.5 + 0.1 * number}, "datasets": {}}
                for number in range(3)]

    monkeypatch.setattr(federated, "run_one", fake_run_one)
    config = load_experiment("parallel").with_overrides(seeds=(0,))

    section = federated.run_federated_mode(config, tmp_path, show_progress=False)

    assert config.federated["run_config"]["local-epochs"] == 1
    assert "1 local epoch(s) per round" in section
    rows = pd.read_csv(tmp_path / "federated.csv")
    assert set(rows.loc[rows["round"] > 0, "client_epochs_per_round"]) == {1}
