"""Checks of the clients' training replies, before any fusion or averaging math.

Every strategy of the project screens its replies here, so OT fusion and the FedAvg
baseline fuse exactly the same set of client models. A reply is checked on its own first
(record layout, number of examples, tensor names, shapes, dtypes and values, against the
current global model), then against the other replies of the round (MetricRecord keys and
the size of the update).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import Message

from otfuse.models.checkpoint import tensors_digest

#: The update-size check compares each reply with the median of the others, which needs at
#: least two others to mean anything.
MIN_REPLIES_FOR_NORM_CHECK = 3

StateDict = Mapping[str, torch.Tensor]
#: Returns the model that a reply is checked against, from the node id, the reply's tensors
#: and the global model. It raises :class:`ReplyError` when the reply fits no such model.
ReferenceFn = Callable[[int, StateDict, StateDict], StateDict]


class ReplyError(ValueError):
    """A client's training reply cannot be fused; the message names the node and the reason."""

    def __init__(self, node_id: int, reason: str, tensor: str | None = None) -> None:
        super().__init__(f"reply of node {node_id}: {reason}")
        self.node_id = node_id
        self.reason = reason
        self.tensor = tensor

    def as_dict(self) -> dict[str, object]:
        return {"node_id": self.node_id, "tensor": self.tensor, "reason": self.reason}


@dataclass(frozen=True)
class ReplyLimits:
    """Limits that a training reply must meet to be fused.

    Parameters
    ----------
    weighted_by_key : str
        MetricRecord key of the number of training examples (Flower's ``"num-examples"``).
    max_num_examples : int
        Largest believable number of examples; a larger claim would dominate the weighted mean.
    max_norm_ratio : float
        A reply whose distance to the global model exceeds this multiple of the median
        distance of the round's other replies is rejected. Needs
        :data:`MIN_REPLIES_FOR_NORM_CHECK` replies that passed the other checks.
    """

    weighted_by_key: str = "num-examples"
    max_num_examples: int = 10_000_000
    max_norm_ratio: float = 10.0

    def __post_init__(self) -> None:
        if self.max_num_examples < 1:
            raise ValueError(f"max_num_examples must be at least 1, got {self.max_num_examples}")
        if not self.max_norm_ratio > 1:
            raise ValueError(f"max_norm_ratio must be greater than 1, got {self.max_norm_ratio}")


@dataclass(frozen=True)
class TrainUpdate:
    """A checked training reply: the client's weights and its number of training examples.

    ``reference`` is the model the reply was checked against when that was not the round's
    global model (a narrower client's starting model, see ``client-width-factors``).
    """

    message: Message
    state_dict: dict[str, torch.Tensor]
    num_examples: float
    reference: StateDict | None = field(default=None, repr=False, compare=False)

    @property
    def node_id(self) -> int:
        return self.message.metadata.src_node_id


@dataclass
class Screening:
    """The replies of one round split into accepted updates and rejected replies."""

    accepted: list[TrainUpdate] = field(default_factory=list)
    rejected: list[ReplyError] = field(default_factory=list)


def screen_train_replies(
    replies: Sequence[Message],
    reference: Mapping[str, torch.Tensor],
    limits: ReplyLimits,
    reference_of: ReferenceFn | None = None,
) -> Screening:
    """Check every reply against ``reference`` (the global model it was trained from).

    Error replies must be removed before. The accepted updates come back sorted by a digest
    of their content, so fusing them gives the same result whatever order the replies
    arrived in. With ``reference_of``, each reply is checked against the model it returns
    instead, and its update size is measured from that model.
    """
    screening = Screening()
    for message in replies:
        try:
            screening.accepted.append(check_train_reply(message, reference, limits, reference_of))
        except ReplyError as error:
            screening.rejected.append(error)

    _reject(screening, _odd_layouts(screening.accepted))
    _reject(screening, _norm_outliers(screening.accepted, reference, limits.max_norm_ratio))
    screening.accepted.sort(key=update_digest)
    return screening


def check_train_reply(
    message: Message,
    reference: Mapping[str, torch.Tensor],
    limits: ReplyLimits,
    reference_of: ReferenceFn | None = None,
) -> TrainUpdate:
    """Return the reply's weights and example count, or raise :class:`ReplyError`.

    A reply is accepted when it has exactly one ArrayRecord and one MetricRecord, the
    MetricRecord contains a whole number of examples in ``[1, limits.max_num_examples]``,
    and the arrays have exactly the tensors, shapes and dtypes of ``reference`` (or of
    ``reference_of(node_id, arrays, reference)`` when given), with finite values.
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
    num_examples = _check_num_examples(node_id, metrics.get(limits.weighted_by_key), limits)

    arrays = next(iter(content.array_records.values()))
    try:
        state_dict = arrays.to_torch_state_dict()
    except (ValueError, TypeError) as error:
        raise ReplyError(node_id, f"arrays cannot be read as tensors: {error}") from error
    if reference_of is None:
        _check_tensors(node_id, state_dict, reference)
        return TrainUpdate(message=message, state_dict=state_dict, num_examples=num_examples)
    own_reference = reference_of(node_id, state_dict, reference)
    _check_tensors(node_id, state_dict, own_reference)
    return TrainUpdate(message=message, state_dict=state_dict, num_examples=num_examples,
                       reference=own_reference)


def _check_num_examples(node_id: int, value: object, limits: ReplyLimits) -> float:
    key = limits.weighted_by_key
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyError(node_id, f"{key!r} is {value!r}, expected a positive whole number")
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ReplyError(node_id, f"{key!r} is {value!r}, expected a positive whole number")
    if value > limits.max_num_examples:
        raise ReplyError(
            node_id,
            f"{key!r} is {value!r}, more than the limit of {limits.max_num_examples} "
            "(run-config key max-num-examples)",
        )
    return float(value)


def _check_tensors(
    node_id: int, state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> None:
    missing = [name for name in reference if name not in state_dict]
    if missing:
        raise ReplyError(node_id, f"tensor {missing[0]!r} is missing ({len(missing)} missing)", missing[0])
    extra = [name for name in state_dict if name not in reference]
    if extra:
        raise ReplyError(
            node_id, f"tensor {extra[0]!r} is not in the global model ({len(extra)} extra)", extra[0]
        )
    for name, expected in reference.items():
        tensor = state_dict[name]
        if tensor.shape != expected.shape:
            raise ReplyError(
                node_id,
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}",
                name,
            )
        if tensor.dtype != expected.dtype:
            raise ReplyError(
                node_id, f"tensor {name!r} has dtype {tensor.dtype}, expected {expected.dtype}", name
            )
        if tensor.is_floating_point():
            bad_values = int((~torch.isfinite(tensor)).sum())
            if bad_values:
                raise ReplyError(
                    node_id, f"tensor {name!r} contains {bad_values} NaN or infinite values", name
                )


def _reject(screening: Screening, rejections: list[tuple[TrainUpdate, ReplyError]]) -> None:
    rejected_ids = {id(update) for update, _ in rejections}
    screening.accepted = [update for update in screening.accepted if id(update) not in rejected_ids]
    screening.rejected.extend(error for _, error in rejections)


def _odd_layouts(updates: list[TrainUpdate]) -> list[tuple[TrainUpdate, ReplyError]]:
    # Flower's averaging reads every reply's records by the names of the first one, and its
    # metric aggregation needs the same keys in every reply, so the majority layout wins.
    if not updates:
        return []
    expected = Counter(record_layout(update) for update in updates).most_common(1)[0][0]
    rejections = []
    for update in updates:
        layout = record_layout(update)
        if layout != expected:
            reason = (
                f"records {_describe_layout(layout)} differ from the other replies' "
                f"{_describe_layout(expected)}"
            )
            rejections.append((update, ReplyError(update.node_id, reason)))
    return rejections


def record_layout(update: TrainUpdate) -> tuple[str, str, frozenset[str]]:
    """Return the names of the update's ArrayRecord and MetricRecord and the metric keys."""
    content = update.message.content
    metrics_name, metrics = next(iter(content.metric_records.items()))
    return next(iter(content.array_records)), metrics_name, frozenset(metrics.keys())


def _describe_layout(layout: tuple[str, str, frozenset[str]]) -> str:
    arrays_name, metrics_name, keys = layout
    return f"(ArrayRecord {arrays_name!r}, MetricRecord {metrics_name!r} with keys {sorted(keys)})"


def _norm_outliers(
    updates: list[TrainUpdate], reference: Mapping[str, torch.Tensor], max_ratio: float
) -> list[tuple[TrainUpdate, ReplyError]]:
    if len(updates) < MIN_REPLIES_FOR_NORM_CHECK:
        return []
    distances = [
        update_distance(update.state_dict, reference if update.reference is None else update.reference)
        for update in updates
    ]
    rejections = []
    for index, update in enumerate(updates):
        others = statistics.median(distances[:index] + distances[index + 1 :])
        # Other replies that did not move at all give no scale to compare with.
        if others > 0 and distances[index] > max_ratio * others:
            reason = (
                f"update norm {distances[index]:.4g} (distance to the global model) is "
                f"{distances[index] / others:.1f} times the median {others:.4g} of the other "
                f"replies, above the limit of {max_ratio:g} (run-config key max-update-norm-ratio)"
            )
            rejections.append((update, ReplyError(update.node_id, reason)))
    return rejections


def update_distance(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """Return the L2 norm of ``state_dict - reference`` over all floating-point tensors."""
    total = 0.0
    for name, expected in reference.items():
        if expected.is_floating_point():
            difference = state_dict[name].double() - expected.double()
            total += float(torch.sum(difference * difference))
    return math.sqrt(total)


def update_digest(update: TrainUpdate) -> str:
    """Return a SHA-256 digest of the update's example count and tensors."""
    text = f"{update.num_examples!r}|{tensors_digest(update.state_dict)}"
    return hashlib.sha256(text.encode()).hexdigest()
