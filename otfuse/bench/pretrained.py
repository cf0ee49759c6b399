"""Pretrained MiniLM against the from-scratch transformer on the three-data-set federation.

Each variant is one ``otfuse run``: three clients, one per data set (IMDB, SST-2,
Sentiment140), the same rows and seed, scored after every round on each data set's
evaluation split. Run it with::

    python -m otfuse.bench.pretrained --data-dir ../shared/data --out docs/results/pretrained

It writes ``results.md`` (the table, the command, the date and the machine) and one folder
of Flower outputs per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from otfuse.bench.federated import run_config_line
from otfuse.bench.runner import machine_description
from otfuse.cli.flower_env import OFFLINE_SWITCHES

DATASETS = ("imdb", "sst2", "sentiment140")
ROWS_PER_CLIENT = 200
TEST_ROWS_PER_DATASET = 200
MAX_LEN = 64
ROUNDS = 1
# Fine-tuning a pretrained encoder needs a far smaller step than training from scratch.
PRETRAINED_LEARNING_RATE = 1e-4
SCRATCH_LEARNING_RATE = 2e-3

COMMON: dict[str, Any] = {
    "seed": 0,
    "datasets": ",".join(DATASETS),
    "partitioning": "per-dataset",
    "max-train-examples": ROWS_PER_CLIENT,
    "max-test-examples": TEST_ROWS_PER_DATASET,
    "model.max-len": MAX_LEN,
    "local-epochs": 2,
    "batch-size": 16,
    # Clients train on all their rows; the server scores on the held-out evaluation splits.
    "local-test-fraction": 0.0,
    "fraction-evaluate": 0.0,
    "min-train-nodes": len(DATASETS),
    "min-evaluate-nodes": 0,
    "min-available-nodes": len(DATASETS),
}
VARIANTS: dict[str, dict[str, Any]] = {
    "scratch, FedAvg": {"strategy": "fedavg", "learning-rate": SCRATCH_LEARNING_RATE},
    "scratch, OT fusion": {"strategy": "otfusion", "learning-rate": SCRATCH_LEARNING_RATE},
    "MiniLM, FedAvg": {"encoder": "minilm", "strategy": "fedavg", "learning-rate": PRETRAINED_LEARNING_RATE},
    "MiniLM, OT fusion": {"encoder": "minilm", "strategy": "otfusion", "learning-rate": PRETRAINED_LEARNING_RATE},
    "MiniLM frozen embeddings, OT fusion": {
        "encoder": "minilm", "strategy": "otfusion", "learning-rate": PRETRAINED_LEARNING_RATE,
        "freeze-embeddings": True,
    },
}


def exchanged_megabytes_per_round(values: Mapping[str, Any]) -> float:
    """Return the MB that one round sends: the model down to and back from every client."""
    from otfuse.runconfig import load_run_config
    from otfuse.task import run_model

    model = run_model(load_run_config(values))
    return 2 * len(DATASETS) * model.exchanged_bytes() / 1e6


def run_variant(name: str, out_dir: Path, data_dir: str) -> dict[str, Any]:
    """Run one variant through ``otfuse run``; return its final scores, bytes and times."""
    values = {**COMMON, **VARIANTS[name]}
    output_dir = out_dir / name.lower().replace(", ", "-").replace(" ", "-")
    command = [
        sys.executable, "-m", "otfuse.cli.main", "run", "--quiet", "--data-dir", data_dir,
        "--rounds", str(ROUNDS), "--num-clients", str(len(DATASETS)),
        "--output-dir", str(output_dir), "--run-config", run_config_line(values),
    ]
    started = time.perf_counter()
    completed = subprocess.run(
        command, env={**os.environ, **OFFLINE_SWITCHES}, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started

    if completed.returncode != 0:
        raise RuntimeError(
            f"variant {name!r} failed with exit code {completed.returncode}:\n{completed.stderr[-3000:]}"
        )
    with open(output_dir / "metrics.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]

    final = records[-1]
    fusion_seconds = [record.get("fusion_seconds") for record in records[1:]]
    return {
        "name": name,
        "accuracy": {dataset: final["datasets"][dataset]["accuracy"] for dataset in DATASETS},
        "overall": final["overall"]["accuracy"],
        "round0_overall": records[0]["overall"]["accuracy"],
        "megabytes": exchanged_megabytes_per_round(values),
        "fusion_seconds": [value for value in fusion_seconds if value is not None],
        "seconds": seconds,
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    header = ["variant", *DATASETS, "overall", "overall before round 1", "MB sent per round",
              "fusion s per round", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for result in results:
        fusion = result["fusion_seconds"]
        fusion_text = f"{sum(fusion) / len(fusion):.1f}" if fusion else "–"
        cells = [
            result["name"],
            *(f"{result['accuracy'][dataset]:.3f}" for dataset in DATASETS),
            f"{result['overall']:.3f}",
            f"{result['round0_overall']:.3f}",
            f"{result['megabytes']:.1f}",
            fusion_text,
            f"{result['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder of the local Parquet data sets")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-pretrained"),
                        help="folder for results.md and the runs' outputs")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="variants to run (default: all)")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    names = args.variants or list(VARIANTS)
    results = [run_variant(name, args.out, str(Path(args.data_dir).resolve())) for name in names]
    report = [
        "# Pretrained MiniLM against the from-scratch transformer",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {machine_description()}.",
        "",
        "Command: `" + " ".join(shlex.quote(part) for part in ["python", "-m", "otfuse.bench.pretrained",
                                                             *(argv if argv is not None else sys.argv[1:])]) + "`",
        "",
        f"Settings of every variant: `{run_config_line(COMMON)}`, rounds: {ROUNDS}. Per variant: "
        + "; ".join(f"{name}: `{run_config_line(values)}`" for name, values in VARIANTS.items() if name in names)
        + ".",
        "",
        "Accuracy of the global model after the last round on each data set's evaluation split:",
        "",
        markdown_table(results),
        "",
    ]
    (args.out / "results.md").write_text("\n".join(report), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
