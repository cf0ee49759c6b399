"""Server strategies: OT fusion and the FedAvg baseline."""

from otfuse.strategies.client_metrics import ClientMetricsLog
from otfuse.strategies.factory import STRATEGY_NAMES, build_strategy
from otfuse.strategies.otfusion import OTFusion, RoundFusion
from otfuse.strategies.replies import ReplyError, TrainUpdate, check_train_reply

__all__ = [
    "STRATEGY_NAMES",
    "ClientMetricsLog",
    "OTFusion",
    "ReplyError",
    "RoundFusion",
    "TrainUpdate",
    "build_strategy",
    "check_train_reply",
]
