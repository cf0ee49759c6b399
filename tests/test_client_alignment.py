"""Client-side alignment: a client moves its model into the global model's units itself."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flower_helpers import FixedNodesGrid, initial_arrays, run_clients, set_task_identity, tiny_run_config
from fusion_helpers import permute_state, random_symmetry, randomised_state
from otfuse import records
from otfuse.client.alignment import align_to_global
from otfuse.fusion import FusionOptions
from otfuse.models import ModelConfig, TransformerClassifier, activation_fn, alignment_spec
from otfuse.strategies import build_strategy
from otfuse.strategies.client_aligned import ClientAlignedFedAvg

torch.set_num_threads(1)

CONFIG = ModelConfig(vocab_size=61, max_len=10, d_model=24, n_heads=2, n_layers=2, d_ff=32)


@pytest.fixture(params=["weight", "activation"])
def cost(request) -> str:
    return request.param


def test_permuted_copy_returns_global_coordinates(cost):
    spec = alignment_spec(CONFIG)
    global_state = randomised_state(TransformerClassifier(CONFIG), seed=0)
    permuted = permute_state(global_state, spec, random_symmetry(spec, seed=1))
    assert max(float((permuted[n] - global_state[n]).abs().max()) for n in global_state) > 0.1
    probe = torch.randint(1, CONFIG.vocab_size, (6, CONFIG.max_len), generator=torch.Generator().manual_seed(2))
    activations = activation_fn(CONFIG, probe) if cost == "activation" else None

    result = align_to_global(permuted, global_state, spec, FusionOptions(cost=cost), activations)

    for name, tensor in global_state.items():
        torch.testing.assert_close(result.state_dict[name], tensor, atol=1e-5, rtol=0)
        assert result.state_dict[name].dtype == permuted[name].dtype
    # float32 weights make the distances of matched units about 1e-8, not exactly 0.
    assert result.transport_cost < 1e-6


def test_activation_cost_needs_activation_function():
    spec = alignment_spec(CONFIG)
    state = randomised_state(TransformerClassifier(CONFIG), seed=0)
    with pytest.raises(ValueError, match="cost='weight'"):
        align_to_global(state, state, spec, FusionOptions(cost="activation"))


def test_server_averages_client_aligned_replies(data_dir, cost):
    """The ClientApp aligns and reports its cost; the server's model is FedAvg's weighted mean."""
    set_task_identity()
    run_config = tiny_run_config(
        data_dir, **{"strategy": "otfusion-client", "client-alignment.cost": cost,
                     "client-alignment.probe-examples": 32, "max-train-examples": 100}
    )
    strategy = build_strategy(run_config)
    assert isinstance(strategy, ClientAlignedFedAvg)
    arrays = initial_arrays(run_config)
    messages = sorted(
        strategy.configure_train(1, arrays, ConfigRecord(), FixedNodesGrid((21, 22, 23))),
        key=lambda message: message.metadata.dst_node_id,
    )
    replies = run_clients(messages, run_config)
    for reply in replies:
        assert records.ALIGNMENT_COST in reply.content[records.METRICS]

    fused, _ = strategy.aggregate_train(1, replies)

    expected = aggregate_arrayrecords([reply.content for reply in replies], records.NUM_EXAMPLES)
    for name, tensor in expected.to_torch_state_dict().items():
        torch.testing.assert_close(fused.to_torch_state_dict()[name], tensor)
    assert sorted(strategy.costs[1]) == [21, 22, 23]
