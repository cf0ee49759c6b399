"""Supervised training of a sequence classifier with AdamW."""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from otfuse.training.inputs import as_input_ids, as_targets, check_label_range, is_multi_label, model_device

logger = logging.getLogger(__name__)

TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
NUM_EXAMPLES = "num_examples"
SECONDS = "seconds"


def train_model(
    model: torch.nn.Module,
    input_ids: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = False,
    proximal_mu: float = 0.0,
    proximal_reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place with AdamW.

    The loss is cross-entropy for class indices and binary cross-entropy on the logits
    (one sigmoid output per class) for multi-hot labels. With ``proximal_mu > 0`` every
    step adds FedProx's proximal term ``proximal_mu / 2 * ||w - w_ref||^2`` over the
    trainable parameters, which pulls the weights toward the reference (the global model
    of the round) and limits client drift.

    The batch order comes from a ``torch.Generator`` seeded with ``seed``, and dropout
    draws from the global generator seeded with ``seed`` inside ``torch.random.fork_rng``,
    so the caller's random state is untouched. On the CPU, the same model, data, seed and
    torch thread count give identical weights. Another thread count changes the order of
    float sums and so the weights. CUDA kernels may add nondeterminism too.

    Parameters
    ----------
    model : torch.nn.Module
        Maps int64 ids of shape (B, T) to logits of shape (B, C); trained on its device.
    input_ids : array or tensor of shape (N, T)
        Token ids.
    labels : array or tensor of shape (N,) or (N, C)
        Class indices in ``[0, C)``, or multi-hot targets in [0, 1], one column per class;
        see :func:`otfuse.training.inputs.as_targets`.
    epochs : int
        Passes over the data.
    batch_size : int
        Examples per optimizer step; the last batch of an epoch may be smaller.
    lr : float
        AdamW learning rate.
    weight_decay : float
        AdamW decoupled weight decay, applied to every parameter.
    seed : int
        Seeds the batch order and dropout.
    progress : bool
        Show a tqdm progress bar over the batches.
    proximal_mu : float
        Weight of the proximal term, >= 0; 0 (the default) trains without it.
    proximal_reference : mapping of str to tensor, optional
        The reference weights ``w_ref`` by parameter name, for example the received global
        model. It must hold every trainable parameter with the same shape. None takes a
        copy of the model's parameters at the start of training. Ignored when
        ``proximal_mu`` is 0.

    Returns
    -------
    dict of str to float
        ``"train_loss"`` and ``"train_accuracy"``: mean loss and accuracy over the last
        epoch, measured on the batches as they were trained (dropout on, weights changing).
        The loss leaves out the proximal term, so it compares across ``proximal_mu`` values.
        For multi-hot labels the accuracy is subset accuracy: the share of examples whose
        every class is right, with a class predicted present when its logit is at least 0.
        ``"num_examples"``: N, as an int. ``"seconds"``: wall-clock training time.

    Raises
    ------
    ValueError
        On empty or mismatched inputs, a label out of range, a non-positive setting, or a
        proximal reference that lacks a trainable parameter or has another shape.
    FloatingPointError
        If the loss becomes NaN or infinite.
    """
    ids = as_input_ids(input_ids)
    targets = as_targets(labels, len(ids))
    _check_settings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
    proximal = _proximal_term(model, proximal_mu, proximal_reference)

    device = model_device(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order_generator = torch.Generator().manual_seed(seed)
    rng_devices = [device] if device.type == "cuda" else []
    was_training = model.training
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            model.train()
            for epoch in range(1, epochs + 1):
                loss, accuracy = _train_epoch(
                    model, optimizer, ids, targets, batch_size, order_generator, device,
                    description=f"epoch {epoch}/{epochs}" if progress else None,
                    proximal=proximal,
                )
                logger.debug("epoch %d/%d: loss %.4f, accuracy %.4f", epoch, epochs, loss, accuracy)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss} in epoch {epoch}; lower lr (now {lr}) "
                        "or check the inputs for invalid values"
                    )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    logger.info(
        "trained %d epochs on %d examples in %.1f s: loss %.4f, accuracy %.4f",
        epochs, len(ids), seconds, loss, accuracy,
    )
    return {TRAIN_LOSS: loss, TRAIN_ACCURACY: accuracy, NUM_EXAMPLES: len(ids), SECONDS: seconds}


def _train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    order_generator: torch.Generator,
    device: torch.device,
    description: str | None,
    proximal: ProximalTerm | None = None,
) -> tuple[float, float]:
    """Run one shuffled pass and return its mean loss and accuracy, without the proximal term."""
    order = torch.randperm(len(ids), generator=order_generator)
    starts = range(0, len(ids), batch_size)
    total_loss = 0.0
    total_correct = 0
    for start in tqdm(starts, desc=description, unit="batch", disable=description is None, leave=False):
        batch = order[start:start + batch_size]
        batch_ids = ids[batch].to(device)
        batch_targets = targets[batch].to(device)
        logits = model(batch_ids)
        check_label_range(batch_targets, logits.shape[-1])
        loss = classification_loss(logits, batch_targets)
        objective = loss if proximal is None else loss + proximal()
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
        total_correct += int(correct_predictions(logits, batch_targets).sum())
    return total_loss / len(ids), total_correct / len(ids)


class ProximalTerm:
    """FedProx's proximal term ``mu / 2 * sum ||w - w_ref||^2`` over the trainable parameters."""

    def __init__(self, mu: float, pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        self.mu = mu
        self.pairs = pairs

    def __call__(self) -> torch.Tensor:
        squared = sum((parameter - reference).pow(2).sum() for parameter, reference in self.pairs)
        return 0.5 * self.mu * squared


def _proximal_term(
    model: torch.nn.Module, mu: float, reference: Mapping[str, torch.Tensor] | None
) -> ProximalTerm | None:
    if isinstance(mu, bool) or not (isinstance(mu, numbers.Real) and math.isfinite(mu) and mu >= 0):
        raise ValueError(f"proximal_mu must be a non-negative finite number, got {mu!r}")
    if mu == 0:
        return None
    pairs = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if reference is None:
            target = parameter.detach().clone()
        elif name not in reference:
            raise ValueError(
                f"proximal_reference has no tensor {name!r}; pass the global model's weights "
                "for every trainable parameter"
            )
        else:
            target = torch.as_tensor(reference[name]).detach()
            if target.shape != parameter.shape:
                raise ValueError(
                    f"proximal_reference tensor {name!r} has shape {tuple(target.shape)}, but the "
                    f"model's parameter has shape {tuple(parameter.shape)}"
                )
            target = target.to(device=parameter.device, dtype=parameter.dtype)
        pairs.append((parameter, target))
    return ProximalTerm(float(mu), pairs)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy for class indices, or the mean binary cross-entropy with
    logits over every (example, class) pair for multi-hot targets."""
    if is_multi_label(targets):
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets)


def correct_predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return a bool per example: the top class is right, or, for multi-hot targets, every class is."""
    if is_multi_label(targets):
        return ((logits >= 0) == (targets >= 0.5)).all(dim=-1)
    return logits.argmax(dim=-1) == targets


def _check_settings(*, epochs: int, batch_size: int, lr: float, weight_decay: float) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(weight_decay, numbers.Real) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
