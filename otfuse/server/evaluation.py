"""Scoring of the global model on the server's held-out global test set."""

from __future__ import annotations

import os
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log

from otfuse.data_partitions import load_global_test
from otfuse.runconfig import BATCH_SIZE, MAX_TEST_EXAMPLES, SEED, RunConfig
from otfuse.task import run_model
from otfuse.training import evaluate_model

OVERALL = "overall"
#: Scores reported per data set and overall, as named by :func:`otfuse.training.evaluate_model`.
SCORES = ("loss", "accuracy", "f1_weighted", "ece", "num_examples")

Scores = dict[str, dict[str, float]]


class GlobalEvaluator:
    """Evaluate global models on the evaluation split of every data set of the run.

    The test rows are loaded and tokenized once, at construction. The server loads no
    client data.
    """

    def __init__(self, config: RunConfig, data_dir: str | os.PathLike | None) -> None:
        self.task = run_model(config)
        tests = load_global_test(
            config.datasets,
            data_dir,
            max_examples_per_dataset=config.optional_cap(MAX_TEST_EXAMPLES),
            seed=config.get(SEED),
        )
        tokenizer = self.task.tokenizer()
        self.inputs = {
            name: (tokenizer.encode(frame["text"].tolist()), frame["label"].to_numpy(dtype=np.int64))
            for name, frame in tests.items()
        }
        self.model = self.task.build()
        self.batch_size = config.get(BATCH_SIZE)
        sizes = ", ".join(f"{name} {len(labels)}" for name, (_, labels) in self.inputs.items())
        log(INFO, "Global test set: %s examples", sizes)

    def evaluate(self, arrays: ArrayRecord) -> Scores:
        """Return loss, accuracy, weighted F1, calibration error and example count per data set and ``overall``."""
        self.task.load_exchanged(self.model, arrays.to_torch_state_dict())
        scores: Scores = {}
        for name, (ids, labels) in self.inputs.items():
            scores[name] = self._score(ids, labels)
        all_ids = np.concatenate([ids for ids, _ in self.inputs.values()])
        all_labels = np.concatenate([labels for _, labels in self.inputs.values()])
        scores[OVERALL] = self._score(all_ids, all_labels)
        return scores

    def _score(self, ids: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        result = evaluate_model(self.model, ids, labels, batch_size=self.batch_size)
        return {key: result[key] for key in SCORES}


def scores_to_metric_record(scores: Scores) -> MetricRecord:
    """Summarise scores for Flower's round log: accuracy per data set, all scores overall.

    Keys look like ``sst2_accuracy`` and ``overall_loss``; metrics.jsonl keeps every score.
    """
    values: dict[str, float] = {}
    for name, scores_of_set in scores.items():
        keys = SCORES if name == OVERALL else ("accuracy",)
        for key in keys:
            values[f"{name}_{key}"] = scores_of_set[key]
    return MetricRecord(values)
