"""Rounds with Flower's SecAgg+ secure aggregation, for ``strategy = "otfusion-client"``.

With ``secagg.enabled = true`` the ServerApp hands the rounds to this module. In flwr 1.42
SecAgg+ exists only for the legacy strategy API: ``DefaultWorkflow`` with a
``SecAggPlusWorkflow`` as its fit workflow, a ``LegacyContext`` and a legacy
``flwr.server.strategy.FedAvg``. The clients align their models to the global model
themselves (:mod:`otfuse.client.secagg`), so the weighted sum that SecAgg+ reveals is the
whole server step. The server never sees a single client's model.

Each round the workflow dequantises the masked sum in float64; :class:`SecureFedAvg`
casts it back to the model's dtypes, and the evaluation function hands every global model
(round 0 included) to the same ``on_round_end`` callback as the Message-API loop, which
scores it, appends the ``metrics.jsonl`` record and writes the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import Scalar, log, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from otfuse import records
from otfuse.runconfig import (
    FRACTION_TRAIN,
    MIN_AVAILABLE_NODES,
    MIN_TRAIN_NODES,
    NUM_SERVER_ROUNDS,
    ROUND_TIMEOUT,
    SECAGG_CLIPPING_RANGE,
    SECAGG_MAX_WEIGHT,
    SECAGG_NUM_SHARES,
    SECAGG_RECONSTRUCTION_THRESHOLD,
    RunConfig,
)
from otfuse.server.evaluation import OVERALL
from otfuse.strategies import ClientMetricsLog

RoundEnd = Callable[[int, ArrayRecord], MetricRecord]


#: Flower's default ``quantization_range`` of SecAgg+, which this app keeps: 2**22 levels.
QUANTIZATION_RANGE = 2**22


def rounding_error_bound(
    num_examples: Sequence[int], clipping_range: float, max_weight: float,
    quantization_range: int = QUANTIZATION_RANGE,
) -> float:
    """Return the largest difference per weight between the SecAgg+ mean and the exact mean.

    Client ``i`` sends its weights times ``d_i = round(n_i / max_weight * Q) / Q``, shifted
    by ``clipping_range`` (``c``) and stochastically rounded to the grid of step ``2c / Q``,
    so each client adds less than one step. The server divides the sum by ``D = sum(d_i)``,
    which gives at most ``2 c k / (Q D)`` for ``k`` clients. Rounding ``d_i`` moves the
    weights of the mean by less than ``1 / (Q D)`` in total, which with weights in
    ``[-c, c]`` adds at most ``c k / (Q D)``.

    Returns
    -------
    float
        ``3 c k / (Q D)``; about 6e-6 for 3 clients of 180 examples with ``max_weight=200``,
        ``c=8`` and ``Q=2**22``. Clipped weights are not covered: the clients refuse to send
        them (:func:`otfuse.client.secagg.check_clipping`).
    """
    shares = sum(round(count / max_weight * quantization_range) for count in num_examples)
    return 3 * clipping_range * len(num_examples) / shares


class SecureFedAvg(FedAvg):
    """Legacy FedAvg whose aggregate has the dtypes of the model instead of float64.

    Under SecAgg+ every ``FitRes`` that reaches ``aggregate_fit`` carries the same unmasked
    weighted mean, so FedAvg's average of them is that mean.
    """

    def __init__(
        self, reference: Mapping[str, torch.Tensor], *, clipping_range: float, max_weight: float,
        **options,
    ) -> None:
        super().__init__(**options)
        self.reference = reference
        self.clipping_range = clipping_range
        self.max_weight = max_weight

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        """Average as FedAvg does, then cast each array to the model's dtype."""
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        counts = [fitres.num_examples for _, fitres in results]
        log(
            INFO,
            "aggregate_fit: SecAgg+ mean of %d client-aligned models (%d examples), rounding "
            "error at most %.2g per weight",
            len(counts), sum(counts), rounding_error_bound(counts, self.clipping_range, self.max_weight),
        )
        state = records.arrays_to_state(parameters_to_ndarrays(parameters), self.reference)
        return ndarrays_to_parameters(records.state_to_arrays(state)), metrics


class _RoundEvaluation:
    """The legacy ``evaluate_fn``: names the arrays, reports the round, keeps the latest model."""

    def __init__(self, reference: Mapping[str, torch.Tensor], initial: ArrayRecord, on_round_end: RoundEnd) -> None:
        self.reference = reference
        self.latest = initial
        self.on_round_end = on_round_end

    def __call__(
        self, server_round: int, arrays: list[np.ndarray], _config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        self.latest = ArrayRecord(records.arrays_to_state(arrays, self.reference))
        metrics = dict(self.on_round_end(server_round, self.latest))
        return float(metrics[f"{OVERALL}_loss"]), metrics


def run_secure_rounds(
    grid: Grid,
    context: Context,
    config: RunConfig,
    initial: ArrayRecord,
    *,
    on_round_end: RoundEnd,
    train_log: ClientMetricsLog,
) -> ArrayRecord:
    """Run ``num-server-rounds`` SecAgg+ rounds from ``initial`` and return the final model.

    ``on_round_end(round, arrays)`` gets the initial model as round 0 and the global model
    after every round. ``train_log`` receives the clients' training metrics, which SecAgg+
    leaves in the clear (only the arrays are masked). Client-side evaluation is off.
    """
    reference = initial.to_torch_state_dict()
    evaluate = _RoundEvaluation(reference, initial, on_round_end)

    def aggregate_train_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        replies = [
            RecordDict({records.METRICS: MetricRecord({**metrics, records.NUM_EXAMPLES: count})})
            for count, metrics in results
        ]
        return dict(train_log(replies, records.NUM_EXAMPLES))

    strategy = SecureFedAvg(
        reference,
        clipping_range=config.get(SECAGG_CLIPPING_RANGE),
        max_weight=config.get(SECAGG_MAX_WEIGHT),
        fraction_fit=config.get(FRACTION_TRAIN),
        fraction_evaluate=0.0,
        min_fit_clients=config.get(MIN_TRAIN_NODES),
        min_evaluate_clients=0,
        min_available_clients=config.get(MIN_AVAILABLE_NODES),
        evaluate_fn=evaluate,
        on_fit_config_fn=lambda server_round: {records.SERVER_ROUND: server_round},
        initial_parameters=ndarrays_to_parameters(records.state_to_arrays(reference)),
        fit_metrics_aggregation_fn=aggregate_train_metrics,
    )
    workflow = SecAggPlusWorkflow(
        num_shares=config.get(SECAGG_NUM_SHARES),
        reconstruction_threshold=config.get(SECAGG_RECONSTRUCTION_THRESHOLD),
        clipping_range=config.get(SECAGG_CLIPPING_RANGE),
        max_weight=config.get(SECAGG_MAX_WEIGHT),
        quantization_range=QUANTIZATION_RANGE,
        timeout=config.get(ROUND_TIMEOUT),
    )
    log(
        INFO,
        "Secure aggregation with SecAgg+: %d shares, reconstruction threshold %d, clipping range "
        "%g, max weight %g; client-side evaluation is off",
        config.get(SECAGG_NUM_SHARES), config.get(SECAGG_RECONSTRUCTION_THRESHOLD),
        config.get(SECAGG_CLIPPING_RANGE), config.get(SECAGG_MAX_WEIGHT),
    )
    legacy_context = LegacyContext(
        context,
        config=ServerConfig(num_rounds=config.get(NUM_SERVER_ROUNDS), round_timeout=config.get(ROUND_TIMEOUT)),
        strategy=strategy,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy_context)
    return evaluate.latest
