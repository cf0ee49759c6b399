"""OTFusion: Flower's FedAvg with the averaging step replaced by optimal-transport fusion."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import DEBUG, ERROR, INFO, WARNING
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from otfuse.fusion import FusionError, FusionOptions, FusionResult, fuse
from otfuse.models import ModelConfig, alignment_spec
from otfuse.strategies.replies import (
    ReplyError,
    TrainUpdate,
    check_train_reply,
    common_metric_keys,
    metric_keys,
)

Anchor = Literal["global", "client"]
ANCHORS: tuple[str, ...] = ("global", "client")


@dataclass
class RoundFusion:
    """Outcome of one round's aggregation: models fused, nodes dropped, time and errors."""

    num_models: int = 0
    dropped_nodes: list[int] = field(default_factory=list)
    seconds: float | None = None
    model_costs: list[float] = field(default_factory=list)
    fallback_groups: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class OTFusion(FedAvg):
    """FedAvg whose aggregation aligns the client models with optimal transport, then averages.

    Node sampling, message construction and the round loop are FedAvg's. Only
    ``aggregate_train`` differs: it checks each reply on its own against the model's
    alignment spec, drops a malformed reply with a log line that names the node, and fuses
    the rest with :func:`otfuse.fusion.fuse`, weighted by each client's number of examples.
    When fusion fails, the round keeps the previous global model.

    Parameters
    ----------
    model_config : ModelConfig
        Config of the global model; its alignment spec describes every client model.
    fusion_options : FusionOptions
        Alignment, regularisation, support masses and barycenter iterations. Its ``anchor``
        index is ignored, because the anchor is chosen by ``anchor``.
    anchor : {"global", "client"}
        ``"global"`` aligns every client model to the current global model, which is not
        averaged in. ``"client"`` aligns to the client model with the most examples (the
        first of them on a tie, in reply order).
    **fedavg_options
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        fusion_options: FusionOptions,
        anchor: Anchor = "global",
        **fedavg_options: Any,
    ) -> None:
        super().__init__(**fedavg_options)
        if anchor not in ANCHORS:
            raise ValueError(f"unknown anchor {anchor!r}; choose one of {', '.join(ANCHORS)}")
        self.model_config = model_config
        self.spec = alignment_spec(model_config)
        self.fusion_options = fusion_options
        self.anchor = anchor
        self.history: dict[int, RoundFusion] = {}
        self._global_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log FedAvg's settings and the fusion settings."""
        super().summary()
        options = self.fusion_options
        log(INFO, "\t└──> Fusion:")
        log(
            INFO,
            "\t\t├── Alignment: %s (reg %g, masses %s)",
            options.alignment, options.reg, options.masses,
        )
        log(INFO, "\t\t├── Anchor: %s", self.anchor)
        log(INFO, "\t\t├── Barycenter iterations: %d", options.barycenter_iters)
        log(INFO, "\t\t└── On plan failure: %s", options.on_plan_failure)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the current global model as the fusion target, then configure as FedAvg."""
        self._global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fuse the valid client models; return None arrays to keep the previous global model."""
        # FedAvg's helper splits off error replies and logs them. Its consistency check
        # rejects the whole round for one bad reply, so replies are checked one by one here.
        valid_replies, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        report = RoundFusion()
        self.history[server_round] = report
        updates = self._accepted_updates(server_round, valid_replies, report)
        if not updates:
            log(
                WARNING,
                "aggregate_train: no usable client model in round %d, so the global model stays",
                server_round,
            )
            return None, None

        contents = [update.message.content for update in updates]
        try:
            validate_message_reply_consistency(
                contents, self.weighted_by_key, check_arrayrecord=True
            )
        except InconsistentMessageReplies as error:
            report.error = str(error)
            log(
                ERROR,
                "aggregate_train: replies of round %d are inconsistent (%s), so the global "
                "model stays",
                server_round, error,
            )
            return None, None
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return self._fuse(server_round, updates, report), metrics

    def _accepted_updates(
        self, server_round: int, replies: list[Message], report: RoundFusion
    ) -> list[TrainUpdate]:
        updates = []
        for message in replies:
            try:
                updates.append(check_train_reply(message, self.spec, self.weighted_by_key))
            except ReplyError as error:
                self._drop(server_round, error.node_id, error.reason, report)
        if updates:
            expected = common_metric_keys(updates)
            consistent = []
            for update in updates:
                keys = metric_keys(update)
                if keys == expected:
                    consistent.append(update)
                else:
                    reason = (
                        f"MetricRecord keys {sorted(keys)} differ from the other replies' "
                        f"{sorted(expected)}"
                    )
                    self._drop(server_round, update.node_id, reason, report)
            updates = consistent
        return updates

    def _drop(self, server_round: int, node_id: int, reason: str, report: RoundFusion) -> None:
        report.dropped_nodes.append(node_id)
        log(
            WARNING,
            "aggregate_train: dropped the reply of node %d in round %d: %s",
            node_id, server_round, reason,
        )

    def _fuse(
        self, server_round: int, updates: list[TrainUpdate], report: RoundFusion
    ) -> ArrayRecord | None:
        models = [update.state_dict for update in updates]
        weights = [update.num_examples for update in updates]
        started = time.perf_counter()
        try:
            result = self._run_fusion(models, weights)
        except (FusionError, ValueError) as error:
            report.error = f"{type(error).__name__}: {error}"
            log(
                ERROR,
                "aggregate_train: fusion failed in round %d (%s), so the global model stays",
                server_round, report.error,
            )
            return None
        report.num_models = len(models)
        report.seconds = time.perf_counter() - started
        report.model_costs = [float(cost) for cost in result.model_costs]
        report.fallback_groups = sorted({record.group for record in result.fallbacks})
        _log_fusion(server_round, updates, result, report, self.fusion_options.alignment, self.anchor)
        fused = {name: tensor.float().contiguous() for name, tensor in result.state_dict.items()}
        return ArrayRecord(fused)

    def _run_fusion(
        self, models: list[dict[str, torch.Tensor]], weights: list[float]
    ) -> FusionResult:
        if self.anchor == "global":
            if self._global_arrays is None:
                raise ValueError(
                    "no global model to align to; call configure_train before aggregate_train"
                )
            reference = self._global_arrays.to_torch_state_dict()
            return fuse(
                models, self.spec, weights, self.fusion_options,
                reference=reference, reference_spec=self.spec,
            )
        anchor_index = int(np.argmax(weights))
        options = dataclasses.replace(self.fusion_options, anchor=anchor_index)
        return fuse(models, self.spec, weights, options)


def _log_fusion(
    server_round: int,
    updates: list[TrainUpdate],
    result: FusionResult,
    report: RoundFusion,
    alignment: str,
    anchor: str,
) -> None:
    log(
        INFO,
        "aggregate_train: fused %d client models in round %d with %s alignment to the %s "
        "anchor in %.2f s",
        report.num_models, server_round, alignment, anchor, report.seconds,
    )
    costs = ", ".join(
        f"node {update.node_id}: {cost:.4g}" for update, cost in zip(updates, report.model_costs)
    )
    if costs:
        log(INFO, "\t└──> Mean transport cost per client model: %s", costs)
    if report.fallback_groups:
        log(
            WARNING,
            "\t└──> plain averaging replaced failed transport plans of groups %s",
            ", ".join(report.fallback_groups),
        )
    records = [record.as_dict() for record in result.diagnostics]
    marginal_errors = [
        float(record["marginal_error"])
        for record in records
        if record.get("marginal_error") is not None
    ]
    if marginal_errors:
        log(
            INFO,
            "\t└──> %d group alignments, max marginal error %.2g",
            len(records), max(marginal_errors),
        )
    for record in records:
        log(DEBUG, "\t\tgroup alignment: %s", record)
