"""Tests of the training loop, evaluation and prediction."""

import numpy as np
import pytest
import torch

from otfuse.data_partitions import EVAL_SPLIT, HashTokenizer, load_split
from otfuse.models import ModelConfig, build_model
from otfuse.training import evaluate_model, predict_proba, train_model

TINY = ModelConfig(vocab_size=1024, max_len=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)
TINY_MULTI = ModelConfig(vocab_size=1024, max_len=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, n_classes=3)


@pytest.fixture(autouse=True)
def single_thread():
    # On a busy 2-core machine, torch's two intra-op threads made these small models 3 to 10
    # times slower than one thread, so pin one thread for stable test times.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def separable_task(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Make padded sequences of random length whose tokens come from the lower half of the
    vocabulary for class 0 and from the upper half for class 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=num_examples)
    half = TINY.vocab_size // 2
    low = np.where(labels[:, None] == 1, half, 1)
    ids = rng.integers(0, half - 1, size=(num_examples, TINY.max_len)) + low
    lengths = rng.integers(4, TINY.max_len + 1, size=num_examples)
    ids[np.arange(TINY.max_len)[None, :] >= lengths[:, None]] = 0
    return ids, labels


def multi_label_task(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Make sequences with one or two of three classes. Each class owns a third of the
    vocabulary, and a sequence draws its tokens from the thirds of its classes."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((num_examples, 3), dtype=np.float32)
    first = rng.integers(0, 3, size=num_examples)
    second = np.where(rng.uniform(size=num_examples) < 0.5, rng.integers(0, 3, size=num_examples), first)
    labels[np.arange(num_examples), first] = 1
    labels[np.arange(num_examples), second] = 1
    third = (TINY_MULTI.vocab_size - 1) // 3
    ids = np.zeros((num_examples, TINY_MULTI.max_len), dtype=np.int64)
    for row in range(num_examples):
        classes = np.flatnonzero(labels[row])
        chosen = rng.choice(classes, size=TINY_MULTI.max_len)
        ids[row] = 1 + chosen * third + rng.integers(0, third, size=TINY_MULTI.max_len)
    return ids, labels


def weights_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_tiny_model_learns_separable_task():
    train_ids, train_labels = separable_task(1000, seed=0)
    test_ids, test_labels = separable_task(300, seed=1)
    model = build_model(TINY, seed=0)
    train_model(model, train_ids, train_labels, epochs=5, batch_size=32, seed=0)
    assert evaluate_model(model, test_ids, test_labels)["accuracy"] > 0.9


def test_same_seed_same_weights():
    ids, labels = separable_task(200, seed=0)
    first = build_model(TINY, seed=3)
    second = build_model(TINY, seed=3)
    train_model(first, ids, labels, epochs=2, batch_size=16, seed=5)
    train_model(second, ids, labels, epochs=2, batch_size=16, seed=5)
    assert weights_equal(first, second)


def test_other_seed_other_weights():
    ids, labels = separable_task(200, seed=0)
    first = build_model(TINY, seed=3)
    second = build_model(TINY, seed=3)
    train_model(first, ids, labels, batch_size=16, seed=5)
    train_model(second, ids, labels, batch_size=16, seed=6)
    assert not weights_equal(first, second)


def test_train_leaves_global_rng_alone():
    ids, labels = separable_task(64, seed=0)
    state = torch.random.get_rng_state()
    train_model(build_model(TINY, seed=0), ids, labels, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_train_result_keys():
    ids, labels = separable_task(100, seed=0)
    result = train_model(build_model(TINY, seed=0), torch.as_tensor(ids), torch.as_tensor(labels), progress=True)
    assert set(result) == {"train_loss", "train_accuracy", "num_examples", "seconds"}
    assert result["num_examples"] == 100
    assert isinstance(result["num_examples"], int)
    assert result["train_loss"] > 0
    assert 0 <= result["train_accuracy"] <= 1


def test_train_keeps_mode():
    ids, labels = separable_task(32, seed=0)
    model = build_model(TINY, seed=0).eval()
    train_model(model, ids, labels)
    assert not model.training


def test_evaluate_result_keys():
    ids, labels = separable_task(50, seed=0)
    result = evaluate_model(build_model(TINY, seed=0), ids, labels, batch_size=16)
    assert set(result) == {"loss", "accuracy", "f1_weighted", "ece", "num_examples"}
    assert result["num_examples"] == 50


def test_untrained_loss_near_log_two():
    # The small initialisation keeps the logits near zero, so the loss starts near ln 2.
    ids, labels = separable_task(200, seed=0)
    assert evaluate_model(build_model(TINY, seed=0), ids, labels)["loss"] == pytest.approx(np.log(2), abs=0.05)


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_evaluate_keeps_mode(training):
    ids, labels = separable_task(20, seed=0)
    model = build_model(TINY, seed=0).train(training)
    evaluate_model(model, ids, labels)
    assert model.training is training


def test_predict_proba_rows_sum_to_one():
    ids, _ = separable_task(70, seed=0)
    probabilities = predict_proba(build_model(TINY, seed=0), ids, batch_size=32)
    assert probabilities.shape == (70, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_predict_proba_deterministic_in_train_mode():
    # Prediction switches dropout off, even for a model left in train mode.
    ids, _ = separable_task(20, seed=0)
    model = build_model(TINY, seed=0).train()
    np.testing.assert_array_equal(predict_proba(model, ids), predict_proba(model, ids))


@pytest.mark.parametrize(
    ("ids", "labels", "message"),
    [
        pytest.param(np.zeros((0, 16), dtype=np.int64), np.zeros(0, dtype=np.int64), "empty", id="empty"),
        pytest.param(np.ones((4, 16), dtype=np.int64), np.zeros(3, dtype=np.int64), r"shape \(4,\)", id="label-count"),
        pytest.param(np.ones(16, dtype=np.int64), np.zeros(1, dtype=np.int64), r"shape \(N, T\)", id="one-dimensional"),
        pytest.param(np.ones((2, 16)), np.zeros(2, dtype=np.int64), "integer token ids", id="float-ids"),
        pytest.param(np.ones((2, 16), dtype=np.int64), np.array([0, 2]), "out of range", id="label-too-large"),
        pytest.param(np.ones((2, 16), dtype=np.int64), np.array([0, -1]), "at least 0", id="negative-label"),
    ],
)
def test_invalid_input_rejected(ids, labels, message):
    with pytest.raises(ValueError, match=message):
        train_model(build_model(TINY, seed=0), ids, labels)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"epochs": 0}, "epochs must be a positive integer", id="zero-epochs"),
        pytest.param({"batch_size": 0}, "batch_size must be a positive integer", id="zero-batch"),
        pytest.param({"lr": 0.0}, "lr must be a positive", id="zero-lr"),
        pytest.param({"weight_decay": -1.0}, "weight_decay must be a non-negative", id="negative-decay"),
    ],
)
def test_invalid_setting_rejected(settings, message):
    ids, labels = separable_task(8, seed=0)
    with pytest.raises(ValueError, match=message):
        train_model(build_model(TINY, seed=0), ids, labels, **settings)


def test_diverging_loss_raises():
    ids, labels = separable_task(64, seed=0)
    model = build_model(TINY, seed=0)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lower lr"):
        train_model(model, ids, labels)


# Multi-label


def test_tiny_model_learns_multi_label_task():
    train_ids, train_labels = multi_label_task(1000, seed=0)
    test_ids, test_labels = multi_label_task(300, seed=1)
    model = build_model(TINY_MULTI, seed=0)
    train_model(model, train_ids, train_labels, epochs=5, batch_size=32, seed=0)
    result = evaluate_model(model, test_ids, test_labels)
    assert result["f1_micro"] > 0.9
    assert result["accuracy"] > 0.7


def test_multi_label_evaluate_keys():
    ids, labels = multi_label_task(40, seed=0)
    result = evaluate_model(build_model(TINY_MULTI, seed=0), ids, labels)
    assert set(result) == {"loss", "accuracy", "f1_micro", "f1_weighted", "ece", "num_examples"}


def test_multi_label_untrained_loss_near_log_two():
    # Near-zero logits give every class probability 1/2, so the binary cross-entropy is ln 2.
    ids, labels = multi_label_task(100, seed=0)
    assert evaluate_model(build_model(TINY_MULTI, seed=0), ids, labels)["loss"] == pytest.approx(np.log(2), abs=0.05)


def test_multi_label_tuples_accepted():
    ids, labels = multi_label_task(50, seed=0)
    as_tuples = np.empty(len(labels), dtype=object)
    as_tuples[:] = [tuple(int(v) for v in row) for row in labels]
    model = build_model(TINY_MULTI, seed=0)
    assert evaluate_model(model, ids, as_tuples) == evaluate_model(model, ids, labels)


def test_multi_label_proba_independent():
    ids, _ = multi_label_task(30, seed=0)
    probabilities = predict_proba(build_model(TINY_MULTI, seed=0), ids, multi_label=True)
    assert probabilities.shape == (30, 3)
    assert np.abs(probabilities.sum(axis=1) - 1.5).max() < 0.2


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        pytest.param(np.ones((4, 2), dtype=np.float32), "2 columns but the model has 3", id="column-count"),
        pytest.param(np.full((4, 3), 2.0, dtype=np.float32), r"lie in \[0, 1\]", id="value-above-one"),
        pytest.param(np.ones((3, 3), dtype=np.float32), "must have 4 rows", id="row-count"),
    ],
)
def test_invalid_multi_hot_rejected(labels, message):
    ids = np.ones((4, TINY_MULTI.max_len), dtype=np.int64)
    with pytest.raises(ValueError, match=message):
        train_model(build_model(TINY_MULTI, seed=0), ids, labels)


@pytest.mark.slow
def test_default_model_learns_sst2(data_dir):
    train = load_split("sst2", "train", data_dir).sample(n=4000, random_state=0)
    validation = load_split("sst2", EVAL_SPLIT["sst2"], data_dir)
    config = ModelConfig()
    tokenizer = HashTokenizer(vocab_size=config.vocab_size, max_len=config.max_len)
    model = build_model(config, seed=0)
    train_model(model, tokenizer.encode(train["text"]), train["label"].to_numpy(), epochs=2, seed=0)
    result = evaluate_model(model, tokenizer.encode(validation["text"]), validation["label"].to_numpy())
    assert result["accuracy"] > 0.6
