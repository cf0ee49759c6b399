"""Build the strategy named in the run config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from otfuse.runconfig import (
    BASELINE_STRATEGIES,
    FRACTION_EVALUATE,
    FRACTION_TRAIN,
    FUSION_ANCHOR,
    FUSION_ROBUST,
    FUSION_ROBUST_THRESHOLD,
    LOCAL_TEST_FRACTION,
    MAX_NUM_EXAMPLES,
    MAX_UPDATE_NORM_RATIO,
    MIN_AVAILABLE_NODES,
    MIN_EVALUATE_NODES,
    MIN_TRAIN_NODES,
    MIN_TRAIN_REPLIES,
    STRATEGY,
    RunConfig,
    RunConfigError,
    load_run_config,
)
from otfuse.strategies.baselines import flower_baseline
from otfuse.strategies.client_aligned import ClientAlignedFedAvg
from otfuse.strategies.measured import measured
from otfuse.strategies.otfusion import OTFusion
from otfuse.strategies.robust import RobustOTFusion
from otfuse.task import run_model
from otfuse.strategies.replies import ReplyLimits
from otfuse.strategies.validated import ValidatedFedAvg
from otfuse.strategies.widths import NodeProjections

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]

STRATEGY_NAMES: tuple[str, ...] = ("otfusion", "fedavg", "otfusion-client", *BASELINE_STRATEGIES)
# Options of the project's reply checks, which Flower's own strategies do not take.
_REPLY_CHECK_OPTIONS = ("reply_limits", "min_train_replies")


def build_strategy(
    run_config: RunConfig | Mapping[str, Any],
    *,
    train_metrics_aggr_fn: MetricsAggregation | None = None,
    evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
) -> Strategy:
    """Return the strategy that the run config's ``strategy`` key names.

    The FedAvg baseline is :class:`ValidatedFedAvg`, Flower's FedAvg behind the same reply
    checks as OTFusion. Both get the same sampling settings and checks, so the two
    strategies run on identical clients and fuse the same replies. The names in
    :data:`~otfuse.runconfig.BASELINE_STRATEGIES` give Flower's own strategies with the same
    sampling settings, without the project's reply checks (see
    :mod:`otfuse.strategies.baselines`). Every strategy comes with
    :class:`~otfuse.strategies.measured.MeasuredStrategy` mixed in, which records the
    aggregation time and the bytes sent and received in each round.

    Raises
    ------
    RunConfigError
        For an invalid run config or an unknown strategy name.
    """
    config = run_config if isinstance(run_config, RunConfig) else load_run_config(run_config)
    name = config.get(STRATEGY)
    fraction_evaluate = config.get(FRACTION_EVALUATE)
    if config.get(LOCAL_TEST_FRACTION) == 0 and fraction_evaluate > 0:
        log(
            INFO,
            "local-test-fraction is 0, so nodes have no held-out data and client-side "
            "evaluation is off",
        )
        fraction_evaluate = 0.0
    common = {
        "fraction_train": config.get(FRACTION_TRAIN),
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": config.get(MIN_TRAIN_NODES),
        "min_evaluate_nodes": config.get(MIN_EVALUATE_NODES),
        "min_available_nodes": config.get(MIN_AVAILABLE_NODES),
        "train_metrics_aggr_fn": train_metrics_aggr_fn,
        "evaluate_metrics_aggr_fn": evaluate_metrics_aggr_fn,
        "reply_limits": ReplyLimits(
            max_num_examples=config.get(MAX_NUM_EXAMPLES),
            max_norm_ratio=config.get(MAX_UPDATE_NORM_RATIO),
        ),
        "min_train_replies": config.get(MIN_TRAIN_REPLIES),
    }
    if name in BASELINE_STRATEGIES:
        strategy_class, options = flower_baseline(name, config)
        sampling = {key: value for key, value in common.items() if key not in _REPLY_CHECK_OPTIONS}
        return measured(strategy_class)(**sampling, **options)
    if name == "otfusion" and config.get(FUSION_ROBUST) != "none":
        if config.get(FUSION_ANCHOR) != "global":
            raise RunConfigError(
                "fusion.robust scores each client by its transport cost to the global model, so "
                "it needs fusion.anchor='global'; set fusion.anchor=global or fusion.robust=none"
            )
        return measured(RobustOTFusion)(
            run_model(config).alignment_spec(),
            config.fusion_options(),
            mode=config.get(FUSION_ROBUST),
            threshold=config.get(FUSION_ROBUST_THRESHOLD),
            **common,
        )
    if name == "otfusion-client":
        return measured(ClientAlignedFedAvg)(**common)
    if name == "otfusion":
        # Run-config validation allows width factors with the global anchor and hard or soft alignment only.
        widths = NodeProjections(config.model_config()) if config.width_factors else None
        return measured(OTFusion)(
            run_model(config).alignment_spec(),
            config.fusion_options(),
            anchor=config.get(FUSION_ANCHOR),
            widths=widths,
            **common,
        )
    if name == "fedavg":
        return measured(ValidatedFedAvg)(**common)
    raise RunConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
