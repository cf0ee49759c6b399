"""Strategy ``otfusion-client``: clients align their own models, the server takes the weighted mean."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log

from otfuse import records
from otfuse.strategies.validated import ValidatedFedAvg


class ClientAlignedFedAvg(ValidatedFedAvg):
    """FedAvg on client models that the clients already aligned to the global model.

    With ``strategy="otfusion-client"`` every ClientApp aligns its trained model to the
    received global model (:func:`otfuse.client.alignment.align_to_global`) before replying,
    so the server's step is FedAvg's weighted mean, which secure aggregation can compute.
    The clients report their transport cost as the metric ``alignment_cost``; ``costs`` keeps
    it per round and node.
    """

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.costs: dict[int, dict[int, float]] = {}

    def summary(self) -> None:
        """Log FedAvg's settings and where the alignment happens."""
        super().summary()
        log(INFO, "\t└──> Alignment: on the clients, to the global model they received")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the clients' alignment costs, then average as FedAvg."""
        replies = list(replies)
        costs = {}
        for message in replies:
            if message.has_error():
                continue
            metrics = message.content.get(records.METRICS)
            if isinstance(metrics, MetricRecord) and records.ALIGNMENT_COST in metrics:
                costs[message.metadata.src_node_id] = float(metrics[records.ALIGNMENT_COST])
        self.costs[server_round] = costs
        if costs:
            log(
                INFO,
                "aggregate_train: client-side transport cost in round %d: %s",
                server_round, ", ".join(f"node {node}: {cost:.4g}" for node, cost in sorted(costs.items())),
            )
        return super().aggregate_train(server_round, replies)
