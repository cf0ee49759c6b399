"""Checks of one client's training reply, before any fusion math."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from flwr.app import Message

from otfuse.fusion import AlignmentSpec, SpecError


class ReplyError(ValueError):
    """A client's training reply cannot be fused; the message names the node and the reason."""

    def __init__(self, node_id: int, reason: str) -> None:
        super().__init__(f"reply of node {node_id}: {reason}")
        self.node_id = node_id
        self.reason = reason


@dataclass(frozen=True)
class TrainUpdate:
    """A checked training reply: the client's weights and its number of training examples."""

    message: Message
    state_dict: dict[str, torch.Tensor]
    num_examples: float

    @property
    def node_id(self) -> int:
        return self.message.metadata.src_node_id


def check_train_reply(message: Message, spec: AlignmentSpec, weighted_by_key: str) -> TrainUpdate:
    """Return the reply's weights and example count, or raise :class:`ReplyError`.

    A reply is accepted when it has exactly one ArrayRecord and one MetricRecord, the
    MetricRecord contains a positive, finite ``weighted_by_key``, and the arrays have exactly the
    tensors and shapes of ``spec`` with finite floating-point values.
    """
    node_id = message.metadata.src_node_id
    content = message.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise ReplyError(
            node_id,
            f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} "
            f"and {len(content.metric_records)}",
        )
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weighted_by_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
        math.isfinite(weight) and weight > 0
    ):
        raise ReplyError(node_id, f"{weighted_by_key!r} is {weight!r}, expected a positive number")

    arrays = next(iter(content.array_records.values()))
    try:
        state_dict = arrays.to_torch_state_dict()
        spec.check_state_dict(state_dict, label=f"node {node_id}'s model")
    except (SpecError, ValueError, TypeError) as error:
        raise ReplyError(node_id, f"arrays do not match the model: {error}") from error
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise ReplyError(node_id, f"tensor {name!r} has dtype {tensor.dtype}, expected floating point")
        if not torch.isfinite(tensor).all():
            raise ReplyError(node_id, f"tensor {name!r} contains NaN or infinite values")
    return TrainUpdate(message=message, state_dict=state_dict, num_examples=float(weight))


def metric_keys(update: TrainUpdate) -> frozenset[str]:
    """Return the keys of the update's MetricRecord."""
    metrics = next(iter(update.message.content.metric_records.values()))
    return frozenset(metrics.keys())


def common_metric_keys(updates: Sequence[TrainUpdate]) -> frozenset[str]:
    """Return the MetricRecord key set that most updates share (the earliest one on a tie)."""
    counts = Counter(metric_keys(update) for update in updates)
    return counts.most_common(1)[0][0]
