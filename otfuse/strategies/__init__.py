"""Server strategies: OT fusion and the FedAvg baseline, both behind the same reply checks."""

from otfuse.strategies.client_metrics import ClientMetricsLog
from otfuse.strategies.factory import STRATEGY_NAMES, build_strategy
from otfuse.strategies.otfusion import OTFusion
from otfuse.strategies.replies import (
    ReplyError,
    ReplyLimits,
    TrainUpdate,
    check_train_reply,
    screen_train_replies,
)
from otfuse.strategies.validated import RoundFusion, ValidatedFedAvg

__all__ = [
    "STRATEGY_NAMES",
    "ClientMetricsLog",
    "OTFusion",
    "ReplyError",
    "ReplyLimits",
    "RoundFusion",
    "TrainUpdate",
    "ValidatedFedAvg",
    "build_strategy",
    "check_train_reply",
    "screen_train_replies",
]
