"""``otfuse run`` with the pretrained MiniLM encoder: one round, two clients, a small SST-2 subset."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from otfuse.cli.flower_env import OFFLINE_SWITCHES
from otfuse.models import load_checkpoint
from otfuse.models.bert import MINILM, BertClassifierConfig
from otfuse.server.outputs import read_metrics

# 128 rows per client (115 to train, 13 held out), 32 tokens per text, 200 test sentences.
RUN_CONFIG = (
    "encoder='minilm' datasets='sst2' partitioning='iid' iid-dataset='sst2' "
    "max-train-examples=128 max-test-examples=200 model.max-len=32 batch-size=16 "
    "learning-rate=0.0001"
)


@pytest.mark.slow
def test_minilm_round_fuses_two_clients(data_dir, tmp_path):
    output_dir = tmp_path / "run"

    completed = subprocess.run(
        [
            sys.executable, "-m", "otfuse.cli.main", "run", "--quiet",
            "--strategy", "otfusion", "--data-dir", str(data_dir), "--rounds", "1",
            "--num-clients", "2", "--output-dir", str(output_dir), "--run-config", RUN_CONFIG,
        ],
        env={**os.environ, **OFFLINE_SWITCHES},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    records = read_metrics(output_dir / "metrics.jsonl")
    assert [record["round"] for record in records] == [0, 1]
    final = records[-1]
    assert final["datasets"]["sst2"]["num_examples"] == 200
    assert final["fusion"]["num_models"] == 2
    assert final["fusion"]["dropped_nodes"] == []
    assert len(final["client_train"]) == 2

    state_dict, config = load_checkpoint(output_dir / "model.safetensors")
    assert config == BertClassifierConfig(MINILM, max_len=32)
    assert tuple(state_dict["bert.embeddings.word_embeddings.weight"].shape) == (30522, 384)
