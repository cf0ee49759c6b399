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


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError if a label is not a valid index into ``num_classes`` logits."""
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
