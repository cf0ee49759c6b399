"""OT fusion that drops or down-weights clients whose transport cost is an outlier."""

from __future__ import annotations

import dataclasses
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.common import log

from otfuse.fusion import AlignmentSpec, FusionOptions, FusionResult
from otfuse.fusion.robust import (
    DEFAULT_THRESHOLD,
    ROBUST_MODES,
    OutlierDecision,
    combined_factors,
    flag_outliers,
    reweighted_average,
)
from otfuse.strategies.otfusion import OTFusion
from otfuse.strategies.replies import TrainUpdate
from otfuse.strategies.validated import RoundFusion


class RobustOTFusion(OTFusion):
    """OTFusion whose per-client transport cost to the global model decides the client's weight.

    Every round, each client model is aligned to the current global model as in
    :class:`OTFusion` with ``anchor="global"``. The mean transport cost of each client is its
    anomaly score, and :func:`otfuse.fusion.robust.flag_outliers` flags the clients whose
    modified z-score (median and MAD of the round's costs) exceeds ``threshold``. A flagged
    client is left out (``mode="drop"``) or its weight is multiplied by ``threshold / z``
    (``mode="downweight"``), and the aligned models are averaged again with the maps already
    computed. The rule needs 3 client models; with fewer, nothing is flagged.

    The cost normalises each unit's weights, so it does not see a model whose weights were
    only multiplied by a positive factor. The reply check ``max-update-norm-ratio`` rejects
    such a model when its update is large enough.

    ``outliers`` maps each round to the flagged node ids, their z-scores and the weight
    factors, and is saved in checkpoints with the rest of the strategy state.
    """

    def __init__(
        self,
        spec: AlignmentSpec,
        fusion_options: FusionOptions,
        *,
        mode: str = "drop",
        threshold: float = DEFAULT_THRESHOLD,
        **options: Any,
    ) -> None:
        if options.pop("anchor", "global") != "global":
            raise ValueError(
                "robust fusion scores clients by their cost to the global model, so it needs "
                "fusion.anchor='global'"
            )
        if mode not in ROBUST_MODES or mode == "none":
            raise ValueError(f"unknown robust mode {mode!r}; choose 'drop' or 'downweight'")
        flag_outliers([], threshold, mode)  # validates the threshold
        super().__init__(spec, fusion_options, anchor="global", **options)
        self.mode = mode
        self.threshold = float(threshold)
        self.outliers: dict[int, dict[str, Any]] = {}
        self._round_nodes: tuple[int, list[int]] = (0, [])

    def summary(self) -> None:
        """Log OTFusion's settings and the outlier rule."""
        super().summary()
        log(INFO, "\t└──> Robust fusion: %s clients whose cost z-score exceeds %g", self.mode, self.threshold)

    def _fuse(self, server_round: int, updates: list[TrainUpdate], report: RoundFusion):
        self._round_nodes = (server_round, [update.node_id for update in updates])
        return super()._fuse(server_round, updates, report)

    def _run_fusion(self, models: list[dict[str, torch.Tensor]], weights: list[float]) -> FusionResult:
        result = super()._run_fusion(models, weights)
        decision = flag_outliers(result.model_costs, self.threshold, self.mode)
        self._record(decision)
        if not decision.flagged:
            return result
        reference = self._global_arrays.to_torch_state_dict()
        state = reweighted_average(
            models, self.spec, result.maps, combined_factors(weights, decision), reference
        )
        return dataclasses.replace(result, state_dict=state)

    def _record(self, decision: OutlierDecision) -> None:
        server_round, nodes = self._round_nodes
        flagged_nodes = [nodes[index] for index in decision.flagged] if nodes else list(decision.flagged)
        self.outliers[server_round] = {
            "flagged_nodes": flagged_nodes,
            "z_scores": dict(zip(map(str, nodes), decision.z_scores)) if nodes else {},
            "factors": dict(zip(map(str, nodes), decision.factors)) if nodes else {},
            "median_cost": decision.median,
            "mad": decision.mad,
        }
        if flagged_nodes:
            log(
                WARNING,
                "aggregate_train: round %d: transport cost of nodes %s is an outlier (z-scores "
                "%s > %g), so their weight is %s",
                server_round, flagged_nodes,
                ", ".join(f"{decision.z_scores[index]:.1f}" for index in decision.flagged),
                self.threshold, "0" if self.mode == "drop" else "reduced",
            )

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy state, with the outlier record of every round."""
        state = super().state_dict()
        state["outliers"] = {str(server_round): record for server_round, record in self.outliers.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        super().load_state_dict(state)
        self.outliers = {int(key): value for key, value in state.get("outliers", {}).items()}
