"""Batched inference and scoring of a classifier."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from otfuse.metrics import classification_metrics
from otfuse.training.inputs import as_input_ids, as_targets, check_label_range, is_multi_label, model_device
from otfuse.training.loop import classification_loss

LOSS = "loss"
NUM_EXAMPLES = "num_examples"


def predict_proba(
    model: torch.nn.Module,
    input_ids: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 256,
    multi_label: bool = False,
) -> np.ndarray:
    """Predict class probabilities.

    Parameters
    ----------
    model : torch.nn.Module
        Maps int64 ids of shape (B, T) to logits of shape (B, C).
    input_ids : array or tensor of shape (N, T)
        Token ids.
    batch_size : int
        Examples per forward pass.
    multi_label : bool
        Apply a sigmoid to each logit, giving the probability that each class is present,
        instead of a softmax over the classes.

    Returns
    -------
    numpy.ndarray
        float32 probabilities of shape (N, C): softmax rows that sum to 1, or independent
        sigmoid outputs with ``multi_label``. The model is left in the train or eval mode
        it had.
    """
    logits = _predict_logits(model, as_input_ids(input_ids), batch_size)
    if multi_label:
        return torch.sigmoid(logits).numpy()
    return torch.softmax(logits, dim=-1).numpy()


def evaluate_model(
    model: torch.nn.Module,
    input_ids: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """Score a classifier in eval mode without gradients.

    Parameters
    ----------
    model : torch.nn.Module
        Maps int64 ids of shape (B, T) to logits of shape (B, C).
    input_ids : array or tensor of shape (N, T)
        Token ids.
    labels : array or tensor of shape (N,) or (N, C)
        Class indices, or multi-hot targets with one column per class.
    batch_size : int
        Examples per forward pass.

    Returns
    -------
    dict of str to float
        ``"loss"`` (mean cross-entropy, or for multi-hot labels mean binary cross-entropy
        per class), the scores of :func:`otfuse.metrics.classification_metrics`
        (``"accuracy"``, ``"f1_weighted"``, ``"ece"``, and ``"f1_micro"`` for multi-hot
        labels, where accuracy is subset accuracy) and ``"num_examples"`` (an int). The
        model is left in the mode it had.
    """
    ids = as_input_ids(input_ids)
    targets = as_targets(labels, len(ids))
    logits = _predict_logits(model, ids, batch_size)
    check_label_range(targets, logits.shape[-1])
    loss = classification_loss(logits.double(), targets).item()
    if is_multi_label(targets):
        probabilities = torch.sigmoid(logits.double()).numpy()
    else:
        probabilities = torch.softmax(logits.double(), dim=-1).numpy()
    return {
        LOSS: loss,
        **classification_metrics(probabilities, targets.numpy()),
        NUM_EXAMPLES: len(ids),
    }


@torch.no_grad()
def _predict_logits(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        batches = [model(ids[start:start + batch_size].to(device)).float().cpu()
                   for start in range(0, len(ids), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(batches)
