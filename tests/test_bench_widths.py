"""``otfuse bench widths``: the variants' run configs, the report, and a tiny run of the command."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from otfuse.bench.federated import run_config_values
from otfuse.bench.widths import (
    CSV_FILE,
    PLOT_FILE,
    RESULTS_FILE,
    STRATEGY,
    TINY_SIZE,
    VARIANTS,
    results_markdown,
    variant_config,
)
from otfuse.cli.flower_env import OFFLINE_SWITCHES
from otfuse.runconfig import load_run_config


def run_config(variant: str):
    return load_run_config(run_config_values(variant_config(variant, TINY_SIZE), STRATEGY, seed=0))


def test_variants_differ_only_in_widths():
    wide, mixed, narrow = (run_config(variant) for variant in VARIANTS)

    assert wide.width_factors == ()
    assert narrow.width_factors == ()
    assert mixed.width_factors == (1.0, 0.5)
    assert (wide.model_config().d_model, wide.model_config().d_ff) == (16, 32)
    assert (narrow.model_config().d_model, narrow.model_config().d_ff) == (8, 16)
    changed = {key for key in wide.values if wide.values[key] != mixed.values[key]}
    assert changed == {"client-width-factors"}
    changed = {key for key in wide.values if wide.values[key] != narrow.values[key]}
    assert changed == {"model.d-model", "model.d-ff"}


def test_unknown_variant_rejected():
    with pytest.raises(ValueError, match="all-wide"):
        variant_config("half", TINY_SIZE)


def test_report_has_mean_and_std_per_variant():
    rows = [
        {"seed": seed, "strategy": variant, "round": 2, "test_set": "overall", "accuracy": 0.6 + 0.01 * seed,
         "f1_weighted": 0.5, "loss": 0.69, "mb_sent_per_round": 0.1}
        for variant in VARIANTS for seed in (0, 1)
    ]

    text = results_markdown(pd.DataFrame(rows), TINY_SIZE, command="otfuse bench widths --tiny")

    assert "`otfuse bench widths --tiny`" in text
    for variant in VARIANTS:
        assert f"| {variant} | **0.605 ± 0.007**" in text


@pytest.mark.slow
def test_tiny_widths_benchmark(data_dir, tmp_path):
    out = tmp_path / "widths"
    completed = subprocess.run(
        [sys.executable, "-m", "otfuse.cli.main", "bench", "widths", "--tiny", "--out", str(out),
         "--data-dir", str(data_dir)],
        env={**os.environ, **OFFLINE_SWITCHES}, capture_output=True, text=True, timeout=900, check=False,
    )

    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    frame = pd.read_csv(out / CSV_FILE)
    assert set(frame["strategy"]) == set(VARIANTS)
    assert (out / PLOT_FILE).is_file()
    text = (out / RESULTS_FILE).read_text(encoding="utf-8")
    assert all(f"| {variant} |" in text for variant in VARIANTS)
