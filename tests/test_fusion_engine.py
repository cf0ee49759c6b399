"""Invariants of the fusion engine on the project's transformer classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from otfuse.fusion import FusionOptions, fuse
from otfuse.models import ModelConfig, TransformerClassifier, activation_fn, alignment_spec

from fusion_helpers import permute_state, random_symmetry, randomised_state

VOCAB = 97


def make_model(config: ModelConfig, seed: int) -> tuple[dict[str, torch.Tensor], TransformerClassifier]:
    model = TransformerClassifier(config).eval()
    state = randomised_state(model, seed)
    model.load_state_dict(state)
    return state, model


def outputs(config: ModelConfig, state: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    model = TransformerClassifier(config).double().eval()
    model.load_state_dict({name: tensor.double() for name, tensor in state.items()})
    with torch.no_grad():
        return model(inputs)


def probe_inputs(config: ModelConfig) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randint(1, config.vocab_size, (8, config.max_len), generator=generator)
    inputs[:2, config.max_len // 2:] = 0  # padded rows exercise the key mask
    return inputs


def max_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    return max(float((left[name].double() - right[name].double()).abs().max()) for name in left)


PERMUTATION_CASES = [
    pytest.param(ModelConfig(vocab_size=VOCAB, max_len=12, d_model=24, n_heads=1, n_layers=1, d_ff=40), id="depth1-heads1"),
    pytest.param(ModelConfig(vocab_size=VOCAB, max_len=12, d_model=24, n_heads=4, n_layers=1, d_ff=40), id="depth1-heads4"),
    pytest.param(ModelConfig(vocab_size=VOCAB, max_len=12, d_model=36, n_heads=1, n_layers=3, d_ff=40), id="depth3-heads1"),
    pytest.param(ModelConfig(vocab_size=VOCAB, max_len=12, d_model=36, n_heads=4, n_layers=3, d_ff=40), id="depth3-heads4"),
]


def test_permuted_copy_has_same_outputs():
    config = PERMUTATION_CASES[3].values[0]
    state, _ = make_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=2))
    inputs = probe_inputs(config)
    assert max_difference(state, permuted) > 0.1
    assert torch.allclose(outputs(config, state, inputs), outputs(config, permuted, inputs), atol=1e-6)


@pytest.mark.parametrize("config", PERMUTATION_CASES)
def test_hard_alignment_recovers_permutation(config):
    state, _ = make_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=2))

    fused = fuse([state, permuted], spec, options=FusionOptions(alignment="hard")).state_dict

    assert max_difference(fused, state) < 1e-6
    inputs = probe_inputs(config)
    assert torch.allclose(outputs(config, fused, inputs), outputs(config, state, inputs), atol=1e-5)


@pytest.mark.parametrize("config", [PERMUTATION_CASES[1], PERMUTATION_CASES[3]])
def test_soft_alignment_recovers_permutation(config):
    state, _ = make_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=2))

    fused = fuse([state, permuted], spec, options=FusionOptions(alignment="soft", reg=0.01)).state_dict

    inputs = probe_inputs(config)
    # Entropic plans keep a little mass off the matched units; 1e-4 on logits of order 1.
    assert torch.allclose(outputs(config, fused, inputs), outputs(config, state, inputs), atol=1e-4)


@pytest.mark.parametrize(
    ("options", "tolerance"),
    [
        pytest.param(FusionOptions(alignment="hard"), 1e-6, id="hard"),
        pytest.param(FusionOptions(alignment="soft", reg=0.01), 1e-6, id="soft-small-reg"),
        # At the default reg, entropic plans leave about exp(-distance / reg) of each unit's mass on
        # its nearest neighbours, which moves weights of order 0.3 by about 1e-4.
        pytest.param(FusionOptions(alignment="soft"), 1e-3, id="soft-default-reg"),
    ],
)
def test_identical_models_fuse_to_themselves(options, tolerance):
    config = PERMUTATION_CASES[3].values[0]
    state, _ = make_model(config, seed=3)
    spec = alignment_spec(config)

    fused = fuse([state, state, state], spec, options=options).state_dict

    assert max_difference(fused, state) < tolerance


@pytest.mark.parametrize(
    "options",
    [FusionOptions(alignment="hard"), FusionOptions(alignment="soft", reg=0.01), FusionOptions(alignment="none")],
    ids=["hard", "soft", "none"],
)
def test_weights_applied_once(options):
    config = PERMUTATION_CASES[1].values[0]
    state, _ = make_model(config, seed=4)
    generator = torch.Generator().manual_seed(5)
    delta = {name: 1e-3 * torch.randn(t.shape, generator=generator) for name, t in state.items()}
    models = [{name: state[name] + k * delta[name] for name in state} for k in range(3)]
    spec = alignment_spec(config)

    fused = fuse(models, spec, weights=[1.0, 1.0, 1.0], options=options).state_dict

    assert max_difference(fused, models[1]) < 1e-6


def test_sample_weights_weight_every_tensor():
    config = PERMUTATION_CASES[0].values[0]
    first, _ = make_model(config, seed=6)
    second = {name: tensor + 1.0 for name, tensor in first.items()}
    spec = alignment_spec(config)

    fused = fuse([first, second], spec, weights=[300, 100], options=FusionOptions(alignment="none")).state_dict

    expected = {name: tensor + 0.25 for name, tensor in first.items()}
    assert max_difference(fused, expected) < 1e-6


def widen_mlp(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Duplicate every MLP unit and halve its outgoing weights: same function, twice the width."""
    wide = dict(state)
    for layer in range(layers):
        prefix = f"blocks.{layer}.mlp"
        wide[f"{prefix}.fc1.weight"] = state[f"{prefix}.fc1.weight"].repeat_interleave(2, dim=0)
        wide[f"{prefix}.fc1.bias"] = state[f"{prefix}.fc1.bias"].repeat_interleave(2)
        wide[f"{prefix}.fc2.weight"] = state[f"{prefix}.fc2.weight"].repeat_interleave(2, dim=1) / 2
    return wide


def test_wide_copy_fuses_into_narrow_width():
    narrow = ModelConfig(vocab_size=VOCAB, max_len=12, d_model=24, n_heads=4, n_layers=2, d_ff=20)
    wide = ModelConfig(vocab_size=VOCAB, max_len=12, d_model=24, n_heads=4, n_layers=2, d_ff=40)
    state, _ = make_model(narrow, seed=8)
    wide_state = widen_mlp(state, narrow.n_layers)
    inputs = probe_inputs(narrow)
    assert torch.allclose(outputs(wide, wide_state, inputs), outputs(narrow, state, inputs), atol=1e-5)

    result = fuse([state, wide_state], [alignment_spec(narrow), alignment_spec(wide)],
                  options=FusionOptions(alignment="hard"))

    assert result.state_dict["blocks.0.mlp.fc1.weight"].shape == (20, 24)
    assert torch.allclose(outputs(narrow, result.state_dict, inputs), outputs(narrow, state, inputs), atol=1e-5)


def test_wide_model_fuses_into_wide_anchor():
    narrow = ModelConfig(vocab_size=VOCAB, max_len=12, d_model=24, n_heads=4, n_layers=1, d_ff=20)
    wide = ModelConfig(vocab_size=VOCAB, max_len=12, d_model=24, n_heads=4, n_layers=1, d_ff=40)
    state, _ = make_model(narrow, seed=9)
    wide_state = widen_mlp(state, narrow.n_layers)
    inputs = probe_inputs(narrow)

    result = fuse([wide_state, state], [alignment_spec(wide), alignment_spec(narrow)],
                  options=FusionOptions(alignment="hard"))

    # Each narrow unit is split over its two copies, with its outgoing weights halved.
    assert torch.allclose(outputs(wide, result.state_dict, inputs), outputs(narrow, state, inputs), atol=1e-5)


def test_barycenter_iterations_keep_permutation_recovery():
    config = PERMUTATION_CASES[1].values[0]
    state, _ = make_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=3))

    fused = fuse([permuted, state], spec, options=FusionOptions(alignment="hard", barycenter_iters=2)).state_dict

    inputs = probe_inputs(config)
    assert torch.allclose(outputs(config, fused, inputs), outputs(config, state, inputs), atol=1e-5)


def test_reference_model_is_not_averaged_in():
    config = PERMUTATION_CASES[1].values[0]
    state, _ = make_model(config, seed=1)
    other, _ = make_model(config, seed=11)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=4))

    fused = fuse([permuted], spec, reference=state, options=FusionOptions(alignment="hard")).state_dict

    assert max_difference(fused, state) < 1e-6
    assert max_difference(fused, other) > 0.1


def test_importance_masses_recover_permutation_outputs():
    config = PERMUTATION_CASES[1].values[0]
    state, _ = make_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=2))

    fused = fuse([state, permuted], spec, options=FusionOptions(alignment="hard", masses="importance")).state_dict

    inputs = probe_inputs(config)
    assert torch.allclose(outputs(config, fused, inputs), outputs(config, state, inputs), atol=1e-5)


def test_diagnostics_report_every_group():
    config = PERMUTATION_CASES[1].values[0]
    state, _ = make_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=2))

    result = fuse([state, permuted], spec, options=FusionOptions(alignment="hard"))

    assert {d.group for d in result.diagnostics} == set(spec.groups)
    assert all(d.marginal_error < 1e-8 for d in result.diagnostics)
    assert all(np.isfinite(d.transport_cost) for d in result.diagnostics)
    assert result.model_costs[0] == 0.0


def test_activation_cost_recovers_permutation():
    config = PERMUTATION_CASES[1].values[0]
    state, _ = make_model(config, seed=1)
    spec = alignment_spec(config)
    permuted = permute_state(state, spec, random_symmetry(spec, seed=2))
    inputs = probe_inputs(config)

    fused = fuse([state, permuted], spec, options=FusionOptions(alignment="hard", cost="activation"),
                 activation_fn=activation_fn(config, inputs)).state_dict

    assert max_difference(fused, state) < 1e-5
    assert torch.allclose(outputs(config, fused, inputs), outputs(config, state, inputs), atol=1e-5)
