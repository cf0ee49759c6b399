"""Tests of accuracy, weighted F1 and expected calibration error."""

import numpy as np
import pytest

from otfuse.metrics import (
    accuracy,
    classification_metrics,
    expected_calibration_error,
    multilabel_calibration_error,
    multilabel_metrics,
    weighted_f1,
)

# Class 0: precision 1, recall 2/3, F1 0.8 (3 labels). Class 1: precision 1/2, recall 1,
# F1 2/3 (1 label). Weighted F1 = (3 * 0.8 + 1 * 2/3) / 4 = 23/30.
LABELS = [0, 0, 0, 1]
PREDICTIONS = [0, 0, 1, 1]

# Confidences 0.91 and 0.99 share the bin (0.9, 1] with one of them correct, so that bin
# contributes 2/4 * |0.5 - 0.95| = 0.225. The bins of 0.65 and 0.75 contribute
# 1/4 * 0.35 and 1/4 * 0.25, for an ECE of 0.375 with 10 bins.
ECE_PROBABILITIES = [[0.91, 0.09], [0.99, 0.01], [0.35, 0.65], [0.25, 0.75]]
ECE_LABELS = [0, 1, 1, 1]


def test_accuracy_hand_example():
    assert accuracy(LABELS, PREDICTIONS) == pytest.approx(0.75)


def test_weighted_f1_hand_example():
    assert weighted_f1(LABELS, PREDICTIONS) == pytest.approx(23 / 30)


def test_weighted_f1_unpredicted_class_scores_zero():
    # Class 1 is never predicted: its F1 is 0 without a warning, class 0 has F1 2/3.
    assert weighted_f1([0, 1], [0, 0]) == pytest.approx(0.5 * 2 / 3)


def test_ece_hand_example():
    assert expected_calibration_error(ECE_PROBABILITIES, ECE_LABELS, n_bins=10) == pytest.approx(0.375)


def test_ece_calibrated_predictor_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, size=200_000)
    labels = np.where(rng.uniform(size=confidence.size) < confidence, 0, 1)
    probabilities = np.stack([confidence, 1.0 - confidence], axis=1)
    assert expected_calibration_error(probabilities, labels) < 0.01


def test_ece_overconfident_predictor():
    probabilities = np.tile([1.0, 0.0], (4, 1))
    assert expected_calibration_error(probabilities, [0, 1, 0, 1]) == pytest.approx(0.5)


def test_ece_single_bin_is_gap_of_means():
    expected = abs(0.5 - np.mean([0.91, 0.99, 0.65, 0.75]))
    assert expected_calibration_error(ECE_PROBABILITIES, [0, 1, 1, 0], n_bins=1) == pytest.approx(expected)


def test_classification_metrics_keys_and_values():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    metrics = classification_metrics(probabilities, LABELS)
    assert set(metrics) == {"accuracy", "f1_weighted", "ece"}
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["f1_weighted"] == pytest.approx(23 / 30)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(probabilities, LABELS))


# Multi-label. Thresholded at 0.5, the predictions are [[1, 0, 1], [0, 0, 1], [1, 1, 0]], and
# only row 0 is exactly right, so subset accuracy is 1/3. Per class (TP, FP, FN, positives):
# class 0 (1, 1, 0, 1) has F1 2/3, class 1 (0, 1, 1, 1) has F1 0, class 2 (2, 0, 1, 3) has
# F1 0.8. Micro: TP 3, FP 2, FN 2, so F1 = 6 / 10. Weighted: (2/3 + 0 + 3 * 0.8) / 5.
MULTI_LABELS = [[1, 0, 1], [0, 1, 1], [0, 0, 1]]
MULTI_PROBABILITIES = [[0.9, 0.2, 0.8], [0.1, 0.4, 0.6], [0.7, 0.6, 0.3]]


def test_multilabel_hand_example():
    metrics = multilabel_metrics(MULTI_PROBABILITIES, MULTI_LABELS)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["f1_micro"] == pytest.approx(0.6)
    assert metrics["f1_weighted"] == pytest.approx((2 / 3 + 3 * 0.8) / 5)


def test_multilabel_subset_accuracy():
    # Rows 0 and 2 now match their predictions exactly, and row 1 misses class 1.
    labels = [[1, 0, 1], [0, 1, 1], [1, 1, 0]]
    assert multilabel_metrics(MULTI_PROBABILITIES, labels)["accuracy"] == pytest.approx(2 / 3)


def test_multilabel_ece_is_binary_ece():
    flat = np.asarray(MULTI_PROBABILITIES).reshape(-1)
    expected = expected_calibration_error(np.stack([1 - flat, flat], axis=1), np.asarray(MULTI_LABELS).reshape(-1))
    assert multilabel_calibration_error(MULTI_PROBABILITIES, MULTI_LABELS) == pytest.approx(expected)


def test_classification_metrics_dispatches_multilabel():
    assert classification_metrics(MULTI_PROBABILITIES, MULTI_LABELS) == multilabel_metrics(
        MULTI_PROBABILITIES, MULTI_LABELS
    )


@pytest.mark.parametrize(
    ("probabilities", "labels", "message"),
    [
        pytest.param([[0.5, 0.5]], [[1, 0, 1]], r"shape \(N, C\)", id="shape-mismatch"),
        pytest.param([[0.5, 0.5]], [[2, 0]], "0 or 1", id="label-not-binary"),
        pytest.param([[1.5, 0.5]], [[1, 0]], "apply a sigmoid", id="probability-above-one"),
        pytest.param(np.zeros((0, 2)), np.zeros((0, 2)), "at least one example", id="empty"),
    ],
)
def test_invalid_multilabel_input_rejected(probabilities, labels, message):
    with pytest.raises(ValueError, match=message):
        multilabel_metrics(probabilities, labels)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: accuracy([0, 1], [0]), "pass one prediction per label", id="length-mismatch"),
        pytest.param(lambda: accuracy([], []), "at least one example", id="empty"),
        pytest.param(lambda: accuracy([[0, 1]], [[0, 1]]), "must be 1-D", id="two-dimensional"),
        pytest.param(
            lambda: expected_calibration_error([[0.5, 0.2]], [0]), "apply softmax", id="rows-not-summing-to-one"
        ),
        pytest.param(lambda: expected_calibration_error([0.5, 0.5], [0]), r"shape \(N, C\)", id="one-dimensional"),
        pytest.param(
            lambda: expected_calibration_error([[0.5, 0.5]], [0, 1]), "one label per row", id="label-count"
        ),
        pytest.param(lambda: expected_calibration_error([[0.5, 0.5]], [0], n_bins=0), "n_bins", id="zero-bins"),
    ],
)
def test_invalid_input_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
