"""Per-round reporting: the server-side evaluation function that Flower calls every round."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from otfuse.server.evaluation import OVERALL, GlobalEvaluator, scores_to_metric_record
from otfuse.server.outputs import MetricsWriter
from otfuse.strategies.measured import MeasuredStrategy, RoundMeasurement
from otfuse.strategies import ClientMetricsLog, ValidatedFedAvg


class RoundReporter:
    """Evaluate the global model after each round, log a summary line and append a record.

    Call an instance as ``reporter(server_round, arrays)`` for round 0 (the initial model)
    and after the aggregation and client evaluation of every later round, when the
    strategy's logs for that round are complete. ``records`` keeps every record written,
    for the round checkpoints. ``strategy`` is None in SecAgg+ runs, whose records have no
    fusion details and no byte counts.
    """

    def __init__(
        self,
        *,
        run_id: int,
        strategy_name: str,
        strategy: Strategy | None,
        num_rounds: int,
        evaluator: GlobalEvaluator,
        writer: MetricsWriter,
        train_log: ClientMetricsLog,
        evaluate_log: ClientMetricsLog,
    ) -> None:
        self.run_id = run_id
        self.strategy_name = strategy_name
        self.strategy = strategy
        self.num_rounds = num_rounds
        self.evaluator = evaluator
        self.writer = writer
        self.train_log = train_log
        self.evaluate_log = evaluate_log
        self.started = time.perf_counter()
        self.records: list[dict[str, Any]] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        started = time.perf_counter()
        scores = self.evaluator.evaluate(arrays)
        self.evaluation_seconds = time.perf_counter() - started
        fusion = self._fusion(server_round)
        _log_round(server_round, self.num_rounds, scores, fusion)
        record = self._record(server_round, scores, fusion)
        self.writer.append(record)
        self.records.append(record)
        return scores_to_metric_record(scores)

    def _fusion(self, server_round: int) -> dict[str, Any] | None:
        if not isinstance(self.strategy, ValidatedFedAvg) or server_round not in self.strategy.history:
            return None
        return self.strategy.history[server_round].as_dict()

    def _measurement(self, server_round: int) -> dict[str, Any]:
        """Return the round's aggregation seconds, array bytes and global evaluation seconds.

        Round 0 has no aggregation and moves no arrays.
        """
        measurement = RoundMeasurement()
        if isinstance(self.strategy, MeasuredStrategy):
            measurement = self.strategy.measurements.get(server_round, measurement)
        return {
            "aggregation_seconds": measurement.aggregation_seconds,
            "bytes_sent": measurement.bytes_sent,
            "bytes_received": measurement.bytes_received,
            "evaluation_seconds": self.evaluation_seconds,
        }

    def _record(self, server_round: int, scores: dict, fusion: dict[str, Any] | None) -> dict[str, Any]:
        datasets = {name: values for name, values in scores.items() if name != OVERALL}
        return {
            "run_id": self.run_id,
            "round": server_round,
            "num_rounds": self.num_rounds,
            "strategy": self.strategy_name,
            "datasets": datasets,
            "overall": scores[OVERALL],
            "fusion_seconds": fusion["seconds"] if fusion else None,
            "fusion": fusion,
            **self._measurement(server_round),
            "client_train": self.train_log.take() if server_round > 0 else [],
            "client_evaluate": self.evaluate_log.take() if server_round > 0 else [],
            "elapsed_seconds": time.perf_counter() - self.started,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _log_round(server_round: int, num_rounds: int, scores: dict, fusion: dict[str, Any] | None) -> None:
    accuracies = " | ".join(f"{name} {values['accuracy']:.3f}" for name, values in scores.items())
    if fusion is None:
        fusion_text = ""
    elif fusion["seconds"] is None or fusion["error"] is not None:
        fusion_text = " | nothing fused, previous model kept"
    else:
        fusion_text = f" | fusion {fusion['seconds']:.2f} s"
    log(
        INFO,
        "[ROUND %d/%d] global test accuracy: %s%s",
        server_round, num_rounds, accuracies, fusion_text,
    )
