"""Robust fusion: the modified z-score rule on transport costs, and a poisoned client in a seeded run."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord

from flower_helpers import FixedNodesGrid, initial_arrays, run_clients, set_task_identity, tiny_run_config
from fusion_helpers import permute_state, random_symmetry, randomised_state
from otfuse.fusion import FusionInputError, FusionOptions, fuse
from otfuse.fusion.robust import flag_outliers, reweighted_average
from otfuse.models import ModelConfig, TransformerClassifier, alignment_spec
from otfuse.runconfig import RunConfigError
from otfuse.strategies import build_strategy
from otfuse.strategies.robust import RobustOTFusion

torch.set_num_threads(1)

CONFIG = ModelConfig(vocab_size=53, max_len=8, d_model=16, n_heads=2, n_layers=1, d_ff=24)


@pytest.mark.parametrize(
    ("scores", "flagged"),
    [
        pytest.param([0.10, 0.11, 0.12, 0.45], [3], id="one-high-outlier"),
        pytest.param([0.10, 0.11, 0.12, 0.01], [], id="low-score-not-suspect"),
        pytest.param([0.2, 0.2, 0.2, 0.2], [], id="identical-scores"),
        pytest.param([0.2, 0.201, 0.2], [], id="one-percent-apart-under-mad-floor"),
        pytest.param([0.1, 0.9], [], id="two-models-too-few"),
        pytest.param([0.10, 0.11, 0.50, 0.52, 0.12, 0.13, 0.09], [2, 3], id="two-outliers-of-seven"),
    ],
)
def test_flag_outliers(scores, flagged):
    assert flag_outliers(scores).flagged == flagged


def test_downweight_factor_is_threshold_over_z():
    decision = flag_outliers([0.10, 0.11, 0.12, 0.45], threshold=3.5, mode="downweight")
    assert decision.factors[:3] == [1.0, 1.0, 1.0]
    assert decision.factors[3] == pytest.approx(3.5 / decision.z_scores[3])
    assert 0 < decision.factors[3] < 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"mode": "median"}, "unknown robust mode", id="unknown-mode"),
        pytest.param({"threshold": 0}, "positive number", id="zero-threshold"),
    ],
)
def test_flag_outliers_rejects_bad_options(kwargs, match):
    with pytest.raises(FusionInputError, match=match):
        flag_outliers([0.1, 0.2, 0.3], **kwargs)


def _client_models(seed: int):
    """A global model and four permuted clients near it; client 3 is sign-flipped."""
    spec = alignment_spec(CONFIG)
    global_state = randomised_state(TransformerClassifier(CONFIG), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    clients = []
    for index in range(4):
        noisy = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator) for name, tensor in global_state.items()}
        clients.append(permute_state(noisy, spec, random_symmetry(spec, seed=seed + 10 + index)))
    clients[3] = {name: -tensor for name, tensor in clients[3].items()}
    return spec, global_state, clients


def test_sign_flipped_client_is_flagged_in_seeded_run():
    spec, global_state, clients = _client_models(seed=3)
    result = fuse(clients, spec, options=FusionOptions(), reference=global_state)
    decision = flag_outliers(result.model_costs)
    assert decision.flagged == [3]
    honest = fuse(clients[:3], spec, options=FusionOptions(), reference=global_state)
    dropped = reweighted_average(clients, spec, result.maps, [1, 1, 1, 0], global_state)
    for name, tensor in honest.state_dict.items():
        torch.testing.assert_close(dropped[name], tensor, atol=1e-5, rtol=0)


def test_reweighted_average_with_equal_weights_is_the_fused_model():
    spec, global_state, clients = _client_models(seed=4)
    result = fuse(clients, spec, options=FusionOptions(), reference=global_state)
    again = reweighted_average(clients, spec, result.maps, [1, 1, 1, 1], global_state)
    for name, tensor in result.state_dict.items():
        torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        pytest.param([0, 0, 0, 0], "not all 0", id="all-zero"),
        pytest.param([1, -1, 1, 1], "non-negative", id="negative"),
        pytest.param([1, 1], "one of each", id="wrong-count"),
    ],
)
def test_reweighted_average_rejects_bad_weights(weights, match):
    spec, global_state, clients = _client_models(seed=5)
    result = fuse(clients, spec, options=FusionOptions(alignment="none"), reference=global_state)
    with pytest.raises(FusionInputError, match=match):
        reweighted_average(clients, spec, result.maps, weights, global_state)


def test_robust_strategy_drops_sign_flipped_client(data_dir):
    """Four real clients of the ClientApp; partition 3 sends its model times -1."""
    set_task_identity()
    run_config = tiny_run_config(
        data_dir, **{"fusion.robust": "drop", "attack.kind": "sign-flip", "attack.partition": 3,
                     "max-update-norm-ratio": 1000.0, "max-train-examples": 120}
    )
    strategy = build_strategy(run_config)
    assert isinstance(strategy, RobustOTFusion)
    arrays = initial_arrays(run_config)
    nodes = (11, 12, 13, 14)
    messages = sorted(
        strategy.configure_train(1, arrays, ConfigRecord(), FixedNodesGrid(nodes)),
        key=lambda message: message.metadata.dst_node_id,
    )
    replies = run_clients(messages, run_config)
    fused, _ = strategy.aggregate_train(1, replies)
    assert fused is not None
    assert strategy.outliers[1]["flagged_nodes"] == [14]
    assert strategy.outliers[1]["factors"]["14"] == 0.0
    assert strategy.state_dict()["outliers"]["1"]["flagged_nodes"] == [14]


def test_robust_needs_global_anchor(data_dir):
    with pytest.raises(RunConfigError, match="fusion.anchor='global'"):
        build_strategy(tiny_run_config(data_dir, **{"fusion.robust": "drop", "fusion.anchor": "client"}))
