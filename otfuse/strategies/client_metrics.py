"""A metrics aggregation function that also keeps each client's metrics of the latest round."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords


class ClientMetricsLog:
    """Aggregate client MetricRecords as FedAvg does, and keep the per-client values.

    Pass an instance as ``train_metrics_aggr_fn`` or ``evaluate_metrics_aggr_fn`` of a
    FedAvg strategy. Strategies call it once per round, so after a round ``latest`` contains one
    dict per client that replied.
    """

    def __init__(self) -> None:
        self.latest: list[dict[str, float]] = []

    def __call__(self, records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        self.latest = [
            {key: value for record in content.metric_records.values() for key, value in record.items()}
            for content in records
        ]
        return aggregate_metricrecords(records, weighted_by_key)

    def take(self) -> list[dict[str, float]]:
        """Return the latest per-client metrics and forget them, so a round reports them once."""
        latest, self.latest = self.latest, []
        return latest
