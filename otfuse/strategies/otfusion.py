"""OTFusion: Flower's FedAvg with the averaging step replaced by optimal-transport fusion."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from logging import DEBUG, ERROR, INFO, WARNING
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from otfuse.fusion import AlignmentSpec, FusionError, FusionOptions, FusionResult, fuse
from otfuse.strategies.replies import ReferenceFn, TrainUpdate
from otfuse.strategies.validated import RoundFusion, ValidatedFedAvg
from otfuse.strategies.widths import NodeProjections

Anchor = Literal["global", "client"]
ANCHORS: tuple[str, ...] = ("global", "client")


class OTFusion(ValidatedFedAvg):
    """FedAvg whose aggregation aligns the client models with optimal transport, then averages.

    Node sampling, message construction, the round loop and the reply checks are those of
    :class:`~otfuse.strategies.validated.ValidatedFedAvg`. Only the combination of the
    accepted client models differs: :func:`otfuse.fusion.fuse` aligns them, then averages
    them weighted by each client's number of examples. When fusion fails, the round keeps
    the previous global model.

    Parameters
    ----------
    spec : AlignmentSpec
        Alignment spec of the tensors that clients send, the same for every client model
        and the global model; :func:`otfuse.task.run_model` builds it from the run config.
    fusion_options : FusionOptions
        Alignment, regularisation, support masses and barycenter iterations. Its ``anchor``
        index is ignored, because the anchor is chosen by ``anchor``.
    anchor : {"global", "client"}
        ``"global"`` aligns every client model to the current global model, which is not
        averaged in. ``"client"`` aligns to the client model with the most examples (on a
        tie, the first in the digest order of
        :func:`~otfuse.strategies.replies.screen_train_replies`).
    widths : NodeProjections, optional
        Accept replies of clients narrower than the global model, fuse them into the global
        width and send every narrow node the global model projected to its width (see
        :mod:`otfuse.strategies.widths`). Needs ``anchor="global"`` and hard or soft
        alignment. Default: every reply must have the global model's shapes.
    **options
        Passed to :class:`~otfuse.strategies.validated.ValidatedFedAvg`.
    """

    def __init__(
        self,
        spec: AlignmentSpec,
        fusion_options: FusionOptions,
        anchor: Anchor = "global",
        *,
        widths: NodeProjections | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if anchor not in ANCHORS:
            raise ValueError(f"unknown anchor {anchor!r}; choose one of {', '.join(ANCHORS)}")
        if widths is not None and (anchor != "global" or fusion_options.alignment == "none"):
            raise ValueError(
                "clients of different widths need anchor='global' and hard or soft alignment, so "
                "that the fused model keeps the global width"
            )
        self.spec = spec
        self.fusion_options = fusion_options
        self.anchor = anchor
        self.widths = widths

    def summary(self) -> None:
        """Log FedAvg's settings, the reply checks and the fusion settings."""
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
        if self.widths is not None:
            log(
                INFO, "\t\t├── Client widths: narrower replies fused into d_model=%d, d_ff=%d",
                *self.widths.global_widths,
            )
        log(INFO, "\t\t└── On plan failure: %s", options.on_plan_failure)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure as ValidatedFedAvg; narrow nodes get the global model at their width."""
        messages = super().configure_train(server_round, arrays, config, grid)
        if self.widths is None:
            return messages
        self._instructions = self.widths.instructions(
            messages, arrays, self.arrayrecord_key, remember=True
        )
        return self._instructions

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure as FedAvg; narrow nodes evaluate the global model at their width."""
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        if self.widths is None:
            return messages
        return self.widths.instructions(messages, arrays, self.arrayrecord_key, remember=False)

    def reply_reference(self) -> ReferenceFn | None:
        """Check narrow replies against their starting model when client widths are on."""
        return None if self.widths is None else self.widths.reply_reference

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fuse the usable client models; return None arrays to keep the previous global model."""
        report, updates = self.usable_updates(server_round, replies)
        if not updates:
            return None, None
        contents = [update.message.content for update in updates]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return self._fuse(server_round, updates, report), metrics

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
        report.num_fallbacks = len(result.fallbacks)
        _log_fusion(server_round, updates, result, report, self.fusion_options.alignment, self.anchor)
        fused = {name: tensor.float().contiguous() for name, tensor in result.state_dict.items()}
        # The inputs are finite, so a NaN here is a numerical fault of the fusion itself.
        broken = [name for name, tensor in fused.items() if not torch.isfinite(tensor).all()]
        if broken:
            report.error = f"fused tensor {broken[0]!r} contains NaN or infinite values"
            log(
                ERROR,
                "aggregate_train: fusion failed in round %d (%s, %d tensors affected), so the "
                "global model stays",
                server_round, report.error, len(broken),
            )
            return None
        if self.widths is not None:
            self.widths.record(updates, result.maps)
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
            specs = self.spec if self.widths is None else [self.widths.spec_of(model) for model in models]
            return fuse(
                models, specs, weights, self.fusion_options,
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
