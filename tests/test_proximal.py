"""FedProx's proximal term in the training loop."""

import numpy as np
import pytest
import torch

from otfuse.models import ModelConfig, build_model
from otfuse.training import train_model
from otfuse.training.loop import _proximal_term

TINY = ModelConfig(vocab_size=256, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=32)


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_task(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, size=(num_examples, TINY.max_len))
    labels = (ids[:, 0] < TINY.vocab_size // 2).astype(np.int64)
    return ids, labels


def distance(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    return float(sum((tensor - reference[name]).pow(2).sum() for name, tensor in model.state_dict().items()))


def trained(mu: float, reference: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    ids, labels = random_task(128, seed=0)
    model = build_model(TINY, seed=1)
    train_model(model, ids, labels, epochs=2, batch_size=16, seed=2, proximal_mu=mu, proximal_reference=reference)
    return model


def test_zero_mu_equals_plain_training():
    ids, labels = random_task(64, seed=0)
    plain = build_model(TINY, seed=1)
    train_model(plain, ids, labels, batch_size=16, seed=2)

    reference = {name: torch.zeros_like(tensor) for name, tensor in plain.state_dict().items()}
    with_zero = build_model(TINY, seed=1)
    train_model(with_zero, ids, labels, batch_size=16, seed=2, proximal_mu=0.0, proximal_reference=reference)

    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, with_zero.state_dict()[name]), name


def test_larger_mu_stays_closer_to_start():
    start = {name: tensor.clone() for name, tensor in build_model(TINY, seed=1).state_dict().items()}

    drift = [distance(trained(mu), start) for mu in (0.0, 1.0, 100.0)]

    assert drift[0] > drift[1] > drift[2]
    assert drift[2] < 0.2 * drift[0]


def test_default_reference_is_start_weights():
    start = {name: tensor.clone() for name, tensor in build_model(TINY, seed=1).state_dict().items()}

    implicit = trained(10.0)
    explicit = trained(10.0, start)

    for name, tensor in implicit.state_dict().items():
        assert torch.equal(tensor, explicit.state_dict()[name]), name


def test_reference_pulls_toward_itself():
    zeros = {name: torch.zeros_like(tensor) for name, tensor in build_model(TINY, seed=1).state_dict().items()}

    toward_zero = trained(100.0, zeros)
    toward_start = trained(100.0)

    assert distance(toward_zero, zeros) < distance(toward_start, zeros)


def test_term_value_and_gradient():
    model = build_model(TINY, seed=1)
    reference = {name: tensor + 0.5 for name, tensor in model.state_dict().items()}
    term = _proximal_term(model, 0.2, reference)

    value = term()
    value.backward()

    count = sum(parameter.numel() for parameter in model.parameters())
    assert float(value.detach()) == pytest.approx(0.5 * 0.2 * 0.25 * count, rel=1e-5)
    for parameter in model.parameters():
        torch.testing.assert_close(parameter.grad, torch.full_like(parameter, -0.2 * 0.5))


def test_reported_loss_excludes_term():
    ids, labels = random_task(64, seed=0)
    far = {name: tensor + 10.0 for name, tensor in build_model(TINY, seed=1).state_dict().items()}
    model = build_model(TINY, seed=1)

    result = train_model(model, ids, labels, batch_size=64, seed=2, lr=1e-9, proximal_mu=1.0, proximal_reference=far)

    # With a negligible learning rate the weights stay put, so the classification loss stays
    # near ln 2 although the proximal term is about 0.5 * 100 per weight.
    assert result["train_loss"] == pytest.approx(np.log(2), abs=0.1)


@pytest.mark.parametrize(
    ("mu", "reference", "message"),
    [
        pytest.param(-1.0, None, "non-negative", id="negative-mu"),
        pytest.param(float("nan"), None, "non-negative", id="nan-mu"),
        pytest.param(True, None, "non-negative", id="bool-mu"),
        pytest.param(1.0, {}, "has no tensor 'tok_emb.weight'", id="missing-tensor"),
        pytest.param(1.0, {"tok_emb.weight": torch.zeros(3, 3)}, r"shape \(3, 3\)", id="wrong-shape"),
    ],
)
def test_invalid_proximal_settings_rejected(mu, reference, message):
    ids, labels = random_task(8, seed=0)
    with pytest.raises(ValueError, match=message):
        train_model(build_model(TINY, seed=0), ids, labels, proximal_mu=mu, proximal_reference=reference)
