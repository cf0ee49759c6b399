"""Conversion and checks of the token-id and label arrays that training and evaluation take."""

from __future__ import annotations

import numpy as np
import torch


def as_input_ids(input_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Return ``input_ids`` as a CPU int64 tensor of shape (N, T), raising ValueError otherwise."""
    ids = _to_tensor(input_ids)
    if ids.ndim != 2:
        raise ValueError(
            f"input_ids must have shape (N, T), got {tuple(ids.shape)}; "
            "encode the texts with HashTokenizer.encode"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    if len(ids) == 0:
        raise ValueError("input_ids is empty; pass at least one example")
    return ids.to(device="cpu", dtype=torch.long)


def as_labels(labels: np.ndarray | torch.Tensor, num_examples: int) -> torch.Tensor:
    """Return ``labels`` as a CPU int64 tensor of shape (num_examples,), raising ValueError otherwise."""
    targets = _to_tensor(labels)
    if targets.shape != (num_examples,):
        raise ValueError(
            f"labels must have shape ({num_examples},) to match input_ids, got {tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {targets.dtype}")
    if int(targets.min()) < 0:
        raise ValueError(
            f"labels must be class indices of at least 0, got {int(targets.min())}; "
            "drop unlabelled rows before training"
        )
    return targets.to(device="cpu", dtype=torch.long)


def as_targets(labels: np.ndarray | torch.Tensor, num_examples: int) -> torch.Tensor:
    """Return class indices or multi-hot targets as a CPU tensor, raising ValueError otherwise.

    Labels of shape (N,) are class indices and come back as int64. Labels of shape (N, C)
    are multi-hot targets, one column per class with values in [0, 1], and come back as
    float32. An object array of equal-length tuples, as in a multi-label frame's ``label``
    column, counts as shape (N, C).
    """
    if isinstance(labels, np.ndarray) and labels.dtype == object and labels.ndim == 1 and len(labels):
        labels = np.array(labels.tolist())
    targets = _to_tensor(labels)
    if targets.ndim != 2:
        return as_labels(targets, num_examples)
    if targets.shape[0] != num_examples:
        raise ValueError(
            f"multi-hot labels must have {num_examples} rows to match input_ids, got shape {tuple(targets.shape)}"
        )
    if targets.dtype.is_complex:
        raise ValueError(f"multi-hot labels must be real numbers in [0, 1], got dtype {targets.dtype}")
    targets = targets.to(device="cpu", dtype=torch.float32)
    if not bool(((targets >= 0) & (targets <= 1)).all()):
        raise ValueError(
            "multi-hot labels must lie in [0, 1] (1 = the class is present), got values "
            f"from {float(targets.min())} to {float(targets.max())}"
        )
    return targets


def is_multi_label(targets: torch.Tensor) -> bool:
    """Return whether ``targets`` (from :func:`as_targets`) are multi-hot rather than class indices."""
    return targets.ndim == 2


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError if a label is not a valid index into ``num_classes`` logits.

    For multi-hot labels, raise if their number of columns is not ``num_classes``.
    """
    if labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(
                f"multi-hot labels have {labels.shape[1]} columns but the model has {num_classes} "
                "outputs; build the model with one output per class"
            )
        return
    largest = int(labels.max())
    if largest >= num_classes:
        raise ValueError(
            f"label {largest} is out of range for a model with {num_classes} classes; "
            "map the labels to 0..n_classes-1 or build the model with more classes"
        )


def model_device(model: torch.nn.Module) -> torch.device:
    """Return the device of the model's first parameter, or the CPU for a model without any."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _to_tensor(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    # A copy, because pandas hands out read-only arrays and torch warns about sharing them.
    array = np.array(values)
    try:
        return torch.from_numpy(array)
    except TypeError as error:
        raise ValueError(f"expected an array of integers, got dtype {array.dtype}") from error
