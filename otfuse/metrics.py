"""Classification metrics on plain arrays: accuracy, F1 and calibration error.

Single-label scores take class indices of shape (N,). Multi-label scores take multi-hot
labels of shape (N, C) and per-class probabilities, thresholded at
:data:`MULTI_LABEL_THRESHOLD`.

This module imports nothing else of otfuse, so clients, the server and the benchmarks
score models the same way.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import accuracy_score, f1_score

ACCURACY = "accuracy"
F1_WEIGHTED = "f1_weighted"
F1_MICRO = "f1_micro"
ECE = "ece"

#: A class counts as predicted present when its probability is at least this value.
MULTI_LABEL_THRESHOLD = 0.5

#: How far a row of probabilities may sum from 1, to allow for float32 softmax rounding.
PROBABILITY_SUM_TOLERANCE = 1e-3


def accuracy(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Return the fraction of predictions equal to the labels."""
    labels, predictions = _paired_labels(labels, predictions)
    return float(accuracy_score(labels, predictions))


def weighted_f1(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Return the F1 score averaged over classes, weighted by each class's label count.

    A class that is never predicted scores 0 instead of raising a warning.
    """
    labels, predictions = _paired_labels(labels, predictions)
    return float(f1_score(labels, predictions, average="weighted", zero_division=0))


def expected_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Compute the top-label expected calibration error with equal-width bins.

    .. math:: \\mathrm{ECE} = \\sum_b \\frac{|B_b|}{N} \\left| \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\right|

    where the confidence of an example is its largest class probability, and bin
    :math:`B_b` contains the examples with confidence in :math:`((b - 1)/n, b/n]`.

    Parameters
    ----------
    probabilities : array of shape (N, C)
        Class probabilities; each row sums to 1.
    labels : array of shape (N,)
        True class indices.
    n_bins : int
        Number of equal-width confidence bins on [0, 1].

    Returns
    -------
    float
        A value in [0, 1]; 0 means that confidence matches accuracy in every bin.
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    probabilities, labels = _probabilities_and_labels(probabilities, labels)
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels

    # Right-closed bins, so confidence 1.0 falls in the last bin and 0.0 in the first.
    bins = np.clip(np.ceil(confidences * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    confidence_sums = np.bincount(bins, weights=confidences, minlength=n_bins)
    correct_sums = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    return float(np.abs(correct_sums - confidence_sums).sum() / len(labels))


def classification_metrics(probabilities: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Score predicted class probabilities against labels.

    Labels of shape (N, C) are multi-hot, and the result is :func:`multilabel_metrics`.

    Returns
    -------
    dict of str to float
        ``"accuracy"`` and ``"f1_weighted"`` of the most probable class, and ``"ece"``
        (:func:`expected_calibration_error` with its default bins).
    """
    if np.ndim(labels) == 2:
        return multilabel_metrics(probabilities, labels)
    probabilities, labels = _probabilities_and_labels(probabilities, labels)
    predictions = probabilities.argmax(axis=1)
    return {
        ACCURACY: accuracy(labels, predictions),
        F1_WEIGHTED: weighted_f1(labels, predictions),
        ECE: expected_calibration_error(probabilities, labels),
    }


def multilabel_metrics(
    probabilities: ArrayLike, labels: ArrayLike, threshold: float = MULTI_LABEL_THRESHOLD
) -> dict[str, float]:
    """Score per-class probabilities against multi-hot labels.

    Parameters
    ----------
    probabilities : array of shape (N, C)
        Probability that each class is present, for example sigmoid outputs.
    labels : array of shape (N, C)
        1 where the class is present, else 0.
    threshold : float
        A class is predicted present when its probability is at least this value.

    Returns
    -------
    dict of str to float
        ``"accuracy"``: subset accuracy, the share of examples whose predicted set of
        classes equals the true set. ``"f1_micro"``: F1 over all (example, class) pairs.
        ``"f1_weighted"``: per-class F1 averaged with weights proportional to each class's
        positive count. ``"ece"``: :func:`multilabel_calibration_error`. A class that is
        never predicted scores F1 0 instead of raising a warning.
    """
    probabilities, labels = _multilabel_inputs(probabilities, labels)
    predictions = (probabilities >= threshold).astype(np.int64)
    return {
        ACCURACY: float(accuracy_score(labels, predictions)),
        F1_MICRO: float(f1_score(labels, predictions, average="micro", zero_division=0)),
        F1_WEIGHTED: float(f1_score(labels, predictions, average="weighted", zero_division=0)),
        ECE: multilabel_calibration_error(probabilities, labels),
    }


def multilabel_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Compute the expected calibration error of every (example, class) pair as a binary decision.

    Each pair is one binary prediction with probabilities ``(1 - p, p)``, so this is
    :func:`expected_calibration_error` over the ``N * C`` pairs.
    """
    probabilities, labels = _multilabel_inputs(probabilities, labels)
    present = probabilities.reshape(-1)
    binary = np.stack([1.0 - present, present], axis=1)
    return expected_calibration_error(binary, labels.reshape(-1), n_bins=n_bins)


def _multilabel_inputs(probabilities: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.ndim != 2 or probabilities.shape != labels.shape:
        raise ValueError(
            f"multi-label probabilities and labels must both have shape (N, C), got "
            f"{probabilities.shape} and {labels.shape}; pass one column per class"
        )
    if len(labels) == 0:
        raise ValueError("labels is empty; a metric needs at least one example")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("multi-hot labels must be 0 or 1; threshold soft targets first")
    if not np.isfinite(probabilities).all() or probabilities.min() < 0 or probabilities.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]; apply a sigmoid to logits first")
    return probabilities, labels.astype(np.int64)


def _paired_labels(labels: ArrayLike, predictions: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.ndim != 1 or predictions.ndim != 1:
        raise ValueError(
            f"labels and predictions must be 1-D, got shapes {labels.shape} and {predictions.shape}"
        )
    if len(labels) != len(predictions):
        raise ValueError(
            f"labels has {len(labels)} entries but predictions has {len(predictions)}; "
            "pass one prediction per label"
        )
    if len(labels) == 0:
        raise ValueError("labels is empty; a metric needs at least one example")
    return labels, predictions


def _probabilities_and_labels(
    probabilities: ArrayLike, labels: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2:
        raise ValueError(
            f"probabilities must have shape (N, C), got {probabilities.shape}; "
            "pass one row of class probabilities per example"
        )
    if labels.shape != (len(probabilities),):
        raise ValueError(
            f"labels has shape {labels.shape} but probabilities has {len(probabilities)} rows; "
            "pass one label per row"
        )
    if len(labels) == 0:
        raise ValueError("probabilities is empty; a metric needs at least one example")
    worst = float(np.abs(probabilities.sum(axis=1) - 1.0).max())
    if not np.isfinite(worst) or worst > PROBABILITY_SUM_TOLERANCE or probabilities.min() < 0:
        raise ValueError(
            "probabilities must be non-negative rows that sum to 1 (largest deviation "
            f"{worst:.3g}); apply softmax to logits first"
        )
    return probabilities, labels
