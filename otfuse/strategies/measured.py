"""Per-round measurements for any message-based strategy: aggregation time and bytes moved.

:func:`measured` derives a subclass of a strategy class whose ``configure_train``,
``configure_evaluate`` and ``aggregate_train`` record what they cost and otherwise call the
parent unchanged, so Flower's strategies keep their math.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

StrategyType = TypeVar("StrategyType", bound=type[Strategy])


@dataclass
class RoundMeasurement:
    """Server-side cost of one round: aggregation wall time and bytes of model arrays.

    ``bytes_sent`` counts the ArrayRecords of every training and evaluation instruction of
    the round, ``bytes_received`` those of the replies (training replies carry the client
    models, evaluation replies only metrics). Both use ``ArrayRecord.count_bytes()``, the
    size of the array data without message headers. ``aggregation_seconds`` is the wall
    time of ``aggregate_train``, reply checks included.
    """

    aggregation_seconds: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    num_train_replies: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def array_bytes(messages: Iterable[Message]) -> int:
    """Return the bytes of every ArrayRecord in the content of ``messages``; errors count 0."""
    total = 0
    for message in messages:
        if message.has_error():
            continue
        total += sum(record.count_bytes() for record in message.content.array_records.values())
    return total


class MeasuredStrategy(Strategy):
    """Mixin that records a :class:`RoundMeasurement` per round in ``measurements``.

    Put it before the strategy class in the bases (as :func:`measured` does), so that each
    method measures and then calls the strategy's own implementation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.measurements: dict[int, RoundMeasurement] = {}

    def measurement(self, server_round: int) -> RoundMeasurement:
        """Return the round's measurement, creating an empty one on first use."""
        return self.measurements.setdefault(server_round, RoundMeasurement())

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.measurement(server_round).bytes_sent += array_bytes(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.measurement(server_round).bytes_sent += array_bytes(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        measurement = self.measurement(server_round)
        measurement.bytes_received += array_bytes(replies)
        measurement.num_train_replies = len(replies)
        started = time.perf_counter()
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            measurement.aggregation_seconds = time.perf_counter() - started

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.measurement(server_round).bytes_received += array_bytes(replies)
        return super().aggregate_evaluate(server_round, replies)


    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's own state, or only its name for Flower's stateless strategies.

        The measurements stay out, because each round's record in metrics.jsonl has them.
        """
        parent = getattr(super(), "state_dict", None)
        return parent() if callable(parent) else {"strategy": type(self).__name__}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state to resume a run.

        Raises
        ------
        ValueError
            If the state belongs to another strategy, or for FedAvgM, FedAdam and FedYogi,
            whose server momentum or moments are not in the state.
        """
        parent = getattr(super(), "load_state_dict", None)
        if callable(parent):
            parent(state)
            return
        name = type(self).__name__
        if state.get("strategy") != name:
            raise ValueError(
                f"the saved strategy state belongs to {state.get('strategy')!r}, not {name!r}; "
                "resume with the strategy the run started with"
            )
        if isinstance(self, (FedAvgM, FedOpt)):
            raise ValueError(
                f"checkpoints do not keep the server optimizer state of {name} (momentum or "
                "moments), so a resumed run would differ from an uninterrupted one; start the "
                "run again from round 0"
            )


@functools.cache
def measured(strategy_class: StrategyType) -> StrategyType:
    """Return a subclass of ``strategy_class`` with :class:`MeasuredStrategy` mixed in.

    The subclass keeps the class name, so logs and saved strategy states name the strategy
    as before. The same class comes back for the same argument.
    """
    if issubclass(strategy_class, MeasuredStrategy):
        return strategy_class
    namespace = {
        "__doc__": f"{strategy_class.__doc__ or strategy_class.__name__}\n\nMeasured per round "
        "by :class:`otfuse.strategies.measured.MeasuredStrategy`.",
        "__module__": __name__,
        "__qualname__": f"measured({strategy_class.__qualname__})",
    }
    return type(strategy_class.__name__, (MeasuredStrategy, strategy_class), namespace)
