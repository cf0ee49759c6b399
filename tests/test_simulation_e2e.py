"""``otfuse run`` end to end: a real Flower simulation with Ray on the offline SST-2 files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otfuse.cli.flower_env import OFFLINE_SWITCHES
from otfuse.models import load_checkpoint
from otfuse.server.outputs import read_metrics

ROUNDS = 2
# Two IID shards of SST-2 with 2000 rows each, 2 local epochs and 2 rounds reached 0.70
# validation accuracy, measured on 2 CPU cores with seed 0. The majority class is 0.51.
MIN_SST2_ACCURACY = 0.60
RUN_CONFIG = (
    "datasets='sst2' partitioning='iid' iid-dataset='sst2' max-train-examples=2000 "
    "max-test-examples=0 local-epochs=2"
)
FLOWER_PROCESS_NAMES = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server")


def flower_processes() -> set[int]:
    """Return the ids of running Flower and Ray processes, read from /proc/*/cmdline."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in command for name in FLOWER_PROCESS_NAMES):
            found.add(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the process check reads /proc")
def test_otfusion_run_beats_chance_on_sst2(data_dir, tmp_path):
    output_dir = tmp_path / "run"
    before = flower_processes()

    completed = subprocess.run(
        [
            sys.executable, "-m", "otfuse.cli.main", "run", "--quiet",
            "--strategy", "otfusion", "--data-dir", str(data_dir), "--rounds", str(ROUNDS),
            "--num-clients", "2", "--output-dir", str(output_dir), "--run-config", RUN_CONFIG,
        ],
        env={**os.environ, **OFFLINE_SWITCHES},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    assert "Global test accuracy" in completed.stdout

    records = read_metrics(output_dir / "metrics.jsonl")
    assert [record["round"] for record in records] == list(range(ROUNDS + 1))
    assert {record["strategy"] for record in records} == {"otfusion"}
    final = records[-1]
    assert final["datasets"]["sst2"]["num_examples"] == 872
    assert final["datasets"]["sst2"]["accuracy"] > MIN_SST2_ACCURACY
    assert final["fusion"]["num_models"] == 2
    assert final["fusion"]["dropped_nodes"] == []
    assert len(final["client_train"]) == 2

    state_dict, config = load_checkpoint(output_dir / "model.safetensors")
    assert config.n_classes == 2
    assert "head.weight" in state_dict

    leftover = flower_processes() - before
    assert leftover == set(), f"Flower or Ray processes still running: {sorted(leftover)}"
