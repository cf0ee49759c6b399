"""Bad input to the fusion engine and the spec builder raises one clear error each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from otfuse.fusion import FusionError, FusionInputError, FusionOptions, SpecBuilder, SpecError, fuse
from otfuse.fusion.solver import check_plan, solve
from otfuse.models import ModelConfig, TransformerClassifier, alignment_spec

from fusion_helpers import randomised_state

SMALL = ModelConfig(vocab_size=50, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=24)


def small_state(config: ModelConfig = SMALL, seed: int = 0) -> dict[str, torch.Tensor]:
    return randomised_state(TransformerClassifier(config), seed)


def with_value(state: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    changed = dict(state)
    tensor = state[name].clone()
    tensor.view(-1)[0] = value
    changed[name] = tensor
    return changed


BAD_CALLS = [
    pytest.param(lambda s: ([], alignment_spec(SMALL), {}), FusionInputError, "no models", id="empty-list"),
    pytest.param(lambda s: ([with_value(s, "head.weight", float("nan")), s], alignment_spec(SMALL), {}),
                 FusionInputError, "NaN or infinite", id="nan-weight"),
    pytest.param(lambda s: ([with_value(s, "tok_emb.weight", float("inf")), s], alignment_spec(SMALL), {}),
                 FusionInputError, "'tok_emb.weight'", id="infinite-weight"),
    pytest.param(lambda s: ([s, s], alignment_spec(SMALL), {"weights": [1.0, 0.0]}),
                 FusionInputError, "weight 1 is 0.0", id="zero-model-weight"),
    pytest.param(lambda s: ([s, s], alignment_spec(SMALL), {"weights": [1.0, -2.0]}),
                 FusionInputError, "positive and finite", id="negative-model-weight"),
    pytest.param(lambda s: ([s, s], alignment_spec(SMALL), {"weights": [1.0]}),
                 FusionInputError, "got 1 weights for 2 models", id="weight-count"),
    pytest.param(lambda s: ([s, s], alignment_spec(SMALL), {"options": FusionOptions(anchor=2)}),
                 FusionInputError, "anchor 2 is out of range", id="anchor-range"),
    pytest.param(lambda s: ([s, small_state(ModelConfig(vocab_size=50, max_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=24))],
                            [alignment_spec(SMALL), alignment_spec(ModelConfig(vocab_size=50, max_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=24))], {}),
                 SpecError, "different depth", id="mismatched-depth"),
    pytest.param(lambda s: ([s, small_state(ModelConfig(vocab_size=60, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=24))],
                            [alignment_spec(SMALL), alignment_spec(ModelConfig(vocab_size=60, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=24))], {}),
                 SpecError, "exempt axes such as the vocabulary", id="mismatched-vocabulary"),
    pytest.param(lambda s: ([s, small_state(ModelConfig(vocab_size=50, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=24, n_classes=3))],
                            [alignment_spec(SMALL), alignment_spec(ModelConfig(vocab_size=50, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=24, n_classes=3))], {}),
                 SpecError, "'head.weight' has size 3 on exempt axis 0", id="mismatched-classes"),
    pytest.param(lambda s: ([s, {k: v for k, v in s.items() if k != "head.bias"}], alignment_spec(SMALL), {}),
                 SpecError, "missing tensor 'head.bias'", id="missing-tensor"),
    pytest.param(lambda s: ([s, {**s, "extra.weight": torch.zeros(2)}], alignment_spec(SMALL), {}),
                 SpecError, "'extra.weight'", id="extra-tensor"),
    pytest.param(lambda s: ([s, {**s, "head.bias": torch.zeros(5)}], alignment_spec(SMALL), {}),
                 SpecError, "'head.bias' has shape (5,)", id="wrong-shape"),
    pytest.param(lambda s: ([s, {**s, "head.bias": torch.zeros(2, dtype=torch.long)}], alignment_spec(SMALL), {}),
                 FusionInputError, "only floating-point", id="integer-tensor"),
    pytest.param(lambda s: (s, alignment_spec(SMALL), {}), FusionInputError, "list of state dicts", id="not-a-list"),
    pytest.param(lambda s: ([s, s], alignment_spec(SMALL), {"options": FusionOptions(cost="activation")}),
                 FusionInputError, "needs activation_fn", id="activation-without-fn"),
]


@pytest.mark.parametrize(("make_call", "error", "message"), BAD_CALLS)
def test_fuse_rejects_bad_input(make_call, error, message):
    models, specs, kwargs = make_call(small_state())
    with pytest.raises(error) as raised:
        fuse(models, specs, **kwargs)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"alignment": "fuzzy"}, "unknown alignment 'fuzzy'", id="alignment"),
        pytest.param({"masses": "random"}, "unknown masses 'random'", id="masses"),
        pytest.param({"cost": "gradient"}, "unknown cost 'gradient'", id="cost"),
        pytest.param({"reg": 0.0}, "reg must be a positive number", id="reg-zero"),
        pytest.param({"sweeps": 0}, "sweeps must be an integer >= 1", id="sweeps"),
        pytest.param({"barycenter_iters": -1}, "barycenter_iters must be an integer >= 0", id="barycenter"),
    ],
)
def test_options_reject_unknown_values(kwargs, message):
    with pytest.raises(FusionInputError) as raised:
        FusionOptions(**kwargs)
    assert message in str(raised.value)


def test_plain_averaging_rejects_different_widths():
    wide = ModelConfig(vocab_size=50, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=48)
    with pytest.raises(SpecError) as raised:
        fuse([small_state(), small_state(wide)], [alignment_spec(SMALL), alignment_spec(wide)],
             options=FusionOptions(alignment="none"))
    assert "plain averaging needs equal widths" in str(raised.value)


def test_sinkhorn_small_reg_gives_valid_plan():
    rng = np.random.default_rng(0)
    cost = rng.random((64, 64))
    cost /= cost.max()
    masses = np.full(64, 1 / 64)

    plan, info = solve(cost, masses, masses, "soft", 0.005, "probe")

    assert np.isfinite(plan).all()
    assert np.allclose(plan.sum(1), masses, atol=1e-6)
    assert np.allclose(plan.sum(0), masses, atol=1e-6)
    assert info.marginal_error < 1e-4


def test_float32_cost_is_solved_in_float64():
    rng = np.random.default_rng(1)
    cost = rng.random((32, 32)).astype(np.float32)
    masses = np.full(32, 1 / 32)

    plan, _ = solve(cost / cost.max(), masses, masses, "soft", 0.005, "probe")

    assert plan.dtype == np.float64
    assert np.isfinite(plan).all()


def test_emd_plan_is_scaled_permutation():
    rng = np.random.default_rng(2)
    masses = np.full(10, 0.1)

    plan, _ = solve(rng.random((10, 10)), masses, masses, "hard", 0.05, "probe")

    assert np.array_equal(np.sort(plan.ravel())[-10:], np.full(10, 0.1))
    assert np.count_nonzero(plan) == 10


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        pytest.param(np.zeros((2, 2)), "total mass 0", id="all-zero"),
        pytest.param(np.full((2, 2), np.nan), "NaN or infinite", id="nan"),
        pytest.param(np.array([[0.5, 0.0], [0.5, 0.0]]), "marginals miss", id="wrong-marginals"),
        pytest.param(np.array([[0.75, -0.25], [-0.25, 0.75]]), "negative entry", id="negative"),
    ],
)
def test_check_plan_rejects_broken_plans(plan, message):
    masses = np.full(2, 0.5)
    with pytest.raises(FusionError) as raised:
        check_plan(plan, masses, masses, "hard", "blocks.3.mlp")
    assert message in str(raised.value)
    assert "'blocks.3.mlp'" in str(raised.value)


def spec_builder() -> SpecBuilder:
    builder = SpecBuilder()
    builder.add_group("hidden")
    builder.linear("fc1", out_group="hidden", in_group=None)
    builder.linear("fc2", out_group=None, in_group="hidden")
    return builder


SHAPES = {"fc1.weight": (8, 3), "fc1.bias": (8,), "fc2.weight": (2, 8), "fc2.bias": (2,)}


def test_spec_rejects_unclaimed_tensor():
    with pytest.raises(SpecError) as raised:
        spec_builder().build({**SHAPES, "fc3.weight": (2, 2)})
    assert "'fc3.weight' has no axes" in str(raised.value)


def test_spec_rejects_disagreeing_sizes():
    with pytest.raises(SpecError) as raised:
        spec_builder().build({**SHAPES, "fc2.weight": (2, 9)})
    assert "'fc2.weight' axis 1 has size 9" in str(raised.value)


def test_spec_rejects_tensor_claimed_twice():
    builder = spec_builder()
    with pytest.raises(SpecError) as raised:
        builder.linear("fc1", out_group="hidden", in_group=None)
    assert "'fc1.weight' is claimed twice" in str(raised.value)


def test_spec_rejects_group_without_producer():
    builder = SpecBuilder()
    builder.add_group("hidden")
    builder.linear("fc2", out_group=None, in_group="hidden")
    with pytest.raises(SpecError) as raised:
        builder.build({"fc2.weight": (2, 8), "fc2.bias": (2,)})
    assert "group 'hidden' has no out axis" in str(raised.value)


def test_spec_rejects_heads_that_do_not_divide():
    builder = SpecBuilder()
    builder.add_group("hidden", num_heads=3)
    builder.linear("fc1", out_group="hidden", in_group=None)
    with pytest.raises(SpecError) as raised:
        builder.build({"fc1.weight": (8, 3), "fc1.bias": (8,)})
    assert "not divisible by 3 heads" in str(raised.value)


def test_spec_rejects_wrong_axis_count():
    with pytest.raises(SpecError) as raised:
        spec_builder().build({**SHAPES, "fc1.bias": (8, 1)})
    assert "'fc1.bias' has 2 axes" in str(raised.value)


def failing_options(**kwargs) -> FusionOptions:
    # Two Sinkhorn iterations at a tiny reg cannot meet the marginal tolerance.
    return FusionOptions(alignment="soft", reg=1e-3, max_sinkhorn_iters=2, **kwargs)


def test_failed_plan_raises_by_default():
    state = small_state()
    other = small_state(seed=1)
    with pytest.raises(FusionError) as raised:
        fuse([state, other], alignment_spec(SMALL), options=failing_options())
    assert "raise the regularisation" in str(raised.value)


def test_failed_plan_falls_back_to_averaging():
    state = small_state()
    other = small_state(seed=1)
    spec = alignment_spec(SMALL)

    result = fuse([state, other], spec, options=failing_options(on_plan_failure="average"))

    plain = fuse([state, other], spec, options=FusionOptions(alignment="none")).state_dict
    assert {record.group for record in result.fallbacks} == set(spec.groups)
    assert all(torch.equal(result.state_dict[name], plain[name]) for name in plain)
