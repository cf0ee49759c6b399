"""The federated round loop, which can start at any round so that a run can resume.

Flower's ``Strategy.start`` always starts at round 1 and offers no hook after a round
other than its evaluation function. This loop makes the same calls in the same order
(``configure_train``, ``send_and_receive``, ``aggregate_train``, then the same for
evaluation) for the rounds ``first_round`` to ``num_rounds``, and calls ``on_round_end``
with the global model after each of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

RoundEnd = Callable[[int, ArrayRecord], None]


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
    timeout: float,
    on_round_end: RoundEnd,
) -> ArrayRecord:
    """Run rounds ``first_round`` to ``num_rounds`` and return the final global model.

    A round whose aggregation returns no arrays keeps the global model it started with.
    ``timeout`` bounds the wait for the replies of each training and evaluation phase, in
    seconds. Nodes that have not replied by then are left out of that phase.
    """
    if first_round > num_rounds:
        log(INFO, "No round left to run: the run already finished round %d", num_rounds)
        return arrays
    started = time.perf_counter()
    for server_round in range(first_round, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %d/%d]", server_round, num_rounds)
        arrays = _train(strategy, grid, server_round, arrays, timeout)
        _evaluate(strategy, grid, server_round, arrays, timeout)
        on_round_end(server_round, arrays)
    log(INFO, "")
    log(
        INFO,
        "Rounds %d to %d finished in %.2f s",
        first_round, num_rounds, time.perf_counter() - started,
    )
    return arrays


def _train(
    strategy: Strategy, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
) -> ArrayRecord:
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=timeout)
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    if metrics is not None:
        log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
    return arrays if new_arrays is None else new_arrays


def _evaluate(
    strategy: Strategy, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float
) -> None:
    messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=timeout)
    metrics = strategy.aggregate_evaluate(server_round, replies)
    if metrics is not None:
        log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
