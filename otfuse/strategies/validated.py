"""FedAvg that screens every training reply and skips a round with too few usable replies."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from otfuse.strategies.replies import ReferenceFn, ReplyLimits, TrainUpdate, screen_train_replies


@dataclass
class RoundFusion:
    """Outcome of one round's aggregation: which replies were used, left out or lost, and why.

    ``dropped_nodes`` sent replies that failed the checks (``rejections`` gives each node,
    tensor and reason), ``failed_nodes`` sent error replies, and ``missing_nodes`` were
    sampled but sent nothing before the round timeout. ``skipped`` gives the reason why a
    round kept the global model although replies arrived.
    """

    num_models: int = 0
    dropped_nodes: list[int] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    failed_nodes: list[int] = field(default_factory=list)
    missing_nodes: list[int] = field(default_factory=list)
    skipped: str | None = None
    seconds: float | None = None
    model_costs: list[float] = field(default_factory=list)
    fallback_groups: list[str] = field(default_factory=list)
    num_fallbacks: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RoundFusion:
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


class ValidatedFedAvg(FedAvg):
    """Flower's FedAvg, averaging only the replies that pass :mod:`otfuse.strategies.replies`.

    Sampling, messages and the weighted mean are FedAvg's. Before averaging, every training
    reply is checked against the global model sent out in the round. A reply that fails is
    left out with a log line naming the node, the tensor and the reason. Error replies and
    sampled nodes that sent nothing are logged by node id. With fewer than
    ``min_train_replies`` usable replies the round is skipped and the global model stays.

    Parameters
    ----------
    reply_limits : ReplyLimits, optional
        Limits of the reply checks; the default uses ``weighted_by_key`` and the defaults of
        :class:`~otfuse.strategies.replies.ReplyLimits`.
    min_train_replies : int
        Usable replies a round needs before it changes the global model.
    **fedavg_options
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(
        self, *, reply_limits: ReplyLimits | None = None, min_train_replies: int = 1, **fedavg_options: Any
    ) -> None:
        super().__init__(**fedavg_options)
        if isinstance(min_train_replies, bool) or not isinstance(min_train_replies, int) or min_train_replies < 1:
            raise ValueError(f"min_train_replies must be an integer >= 1, got {min_train_replies!r}")
        self.reply_limits = reply_limits or ReplyLimits(weighted_by_key=self.weighted_by_key)
        if self.reply_limits.weighted_by_key != self.weighted_by_key:
            raise ValueError(
                f"reply_limits.weighted_by_key is {self.reply_limits.weighted_by_key!r} but the "
                f"strategy weights by {self.weighted_by_key!r}; pass the same key to both"
            )
        self.min_train_replies = min_train_replies
        self.history: dict[int, RoundFusion] = {}
        self._global_arrays: ArrayRecord | None = None
        self._instructions: list[Message] = []

    def summary(self) -> None:
        """Log FedAvg's settings and the reply checks."""
        super().summary()
        limits = self.reply_limits
        log(INFO, "\t└──> Reply checks:")
        log(INFO, "\t\t├── Minimum usable replies per round: %d", self.min_train_replies)
        log(INFO, "\t\t├── Maximum examples per reply: %d", limits.max_num_examples)
        log(INFO, "\t\t└── Maximum update norm over the others' median: %g", limits.max_norm_ratio)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model and the instructions, then configure as FedAvg."""
        self._global_arrays = arrays
        # The Grid gives these Message objects their ids when it sends them, which lets
        # aggregate_train find the node that an error reply of the SuperLink is about.
        self._instructions = list(super().configure_train(server_round, arrays, config, grid))
        return self._instructions

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the usable replies with FedAvg's weighted mean; None keeps the global model."""
        report, updates = self.usable_updates(server_round, replies)
        if not updates:
            return None, None
        contents = [update.message.content for update in updates]
        started = time.perf_counter()
        arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        report.seconds = time.perf_counter() - started
        report.num_models = len(updates)
        log(
            INFO,
            "aggregate_train: averaged %d client models in round %d in %.2f s",
            report.num_models, server_round, report.seconds,
        )
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate client-side evaluation as FedAvg does; inconsistent replies give None.

        Client-side evaluation only reports metrics, so a malformed reply costs the round's
        aggregated evaluation metrics instead of ending the run.
        """
        replies = list(replies)
        try:
            return super().aggregate_evaluate(server_round, replies)
        except InconsistentMessageReplies as error:
            nodes = sorted(message.metadata.src_node_id for message in replies if not message.has_error())
            log(
                ERROR,
                "aggregate_evaluate: evaluation replies of nodes %s in round %d are inconsistent "
                "(%s), so the round has no aggregated client evaluation metrics",
                nodes, server_round, error,
            )
            return None

    def usable_updates(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[RoundFusion, list[TrainUpdate]]:
        """Check the round's replies and return its report and the updates to fuse.

        The list is empty when fewer than ``min_train_replies`` replies are usable, and the
        report then gives the reason.
        """
        if self._global_arrays is None:
            raise RuntimeError(
                "aggregate_train was called before configure_train, so there is no global "
                "model to check the replies against"
            )
        # FedAvg's helper logs the counts and each error reply. Its consistency check would
        # reject the whole round for one bad reply, so the replies are checked here instead.
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        report = RoundFusion()
        self.history[server_round] = report
        self._record_lost_nodes(server_round, replies, errors, report)

        screening = screen_train_replies(
            valid, self._global_arrays.to_torch_state_dict(), self.reply_limits,
            self.reply_reference(),
        )
        for error in screening.rejected:
            report.dropped_nodes.append(error.node_id)
            report.rejections.append(error.as_dict())
            log(
                WARNING,
                "aggregate_train: rejected the reply of node %d in round %d: %s",
                error.node_id, server_round, error.reason,
            )
        if len(screening.accepted) < self.min_train_replies:
            report.skipped = (
                f"{len(screening.accepted)} usable replies from {len(self._instructions)} "
                f"sampled nodes, fewer than min-train-replies={self.min_train_replies}"
            )
            log(
                WARNING,
                "aggregate_train: skipped round %d because it has %s; the global model stays",
                server_round, report.skipped,
            )
            return report, []
        return report, screening.accepted

    def reply_reference(self) -> ReferenceFn | None:
        """Return what picks each reply's reference model; None checks every reply against the global model."""
        return None

    def _record_lost_nodes(
        self, server_round: int, replies: list[Message], errors: list[Message], report: RoundFusion
    ) -> None:
        for message in errors:
            node_id = self._reply_origin(message)
            report.failed_nodes.append(node_id)
            log(
                WARNING,
                "aggregate_train: lost node %d in round %d: error reply (code %d: %s)",
                node_id, server_round, message.error.code, message.error.reason,
            )
        replied = {self._reply_origin(message) for message in replies}
        sampled = [message.metadata.dst_node_id for message in self._instructions]
        report.missing_nodes = [node for node in sampled if node not in replied]
        for node_id in report.missing_nodes:
            log(
                WARNING,
                "aggregate_train: lost node %d in round %d: no reply before the round timeout",
                node_id, server_round,
            )

    def _reply_origin(self, reply: Message) -> int:
        """Return the node that ``reply`` answers for.

        Flower's SuperLink sends the error reply for a node it lost (no heartbeat) from its
        own id, 1, so the node is found through the instruction that the reply answers.
        """
        for instruction in self._instructions:
            message_id = instruction.metadata.message_id
            if message_id and message_id == reply.metadata.reply_to_message_id:
                return instruction.metadata.dst_node_id
        return reply.metadata.src_node_id

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's state as JSON-serialisable values, for checkpoints."""
        return {
            "strategy": type(self).__name__,
            "history": {str(server_round): report.as_dict() for server_round, report in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        name = state.get("strategy")
        if name != type(self).__name__:
            raise ValueError(
                f"the saved strategy state belongs to {name!r}, not {type(self).__name__!r}; "
                "resume with the strategy the run started with"
            )
        self.history = {
            int(server_round): RoundFusion.from_dict(values)
            for server_round, values in state.get("history", {}).items()
        }
