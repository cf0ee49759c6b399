"""Projection between widths: lifting a narrow model and projecting it back is consistent."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fusion_helpers import randomised_state
from otfuse.fusion import FusionOptions, SpecError, TransportMap, fuse
from otfuse.fusion.projection import lift, project, truncation_maps
from otfuse.models import ModelConfig, TransformerClassifier, alignment_spec
from otfuse.models.spec import block_groups

torch.set_num_threads(1)

WIDE = ModelConfig(vocab_size=53, max_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=32)
NARROW = dataclasses.replace(WIDE, d_ff=16)


def duplicating_maps(seed: int) -> dict[str, TransportMap]:
    """Identity on every group but the MLPs, where narrow unit i goes to two shuffled wide units."""
    wide_spec = alignment_spec(WIDE)
    generator = torch.Generator().manual_seed(seed)
    mlp_groups = {block_groups(layer)[2] for layer in range(WIDE.n_layers)}
    maps = {}
    for name, group in wide_spec.groups.items():
        if name not in mlp_groups:
            maps[name] = TransportMap.identity(group.size)
            continue
        order = torch.randperm(WIDE.d_ff, generator=generator)
        plan = torch.zeros(NARROW.d_ff, WIDE.d_ff, dtype=torch.float64)
        for unit in range(NARROW.d_ff):
            plan[unit, order[2 * unit]] = plan[unit, order[2 * unit + 1]] = 1.0 / WIDE.d_ff
        maps[name] = TransportMap(plan)
    return maps


def logits(config: ModelConfig, state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = TransformerClassifier(config).double().eval()
    model.load_state_dict({name: tensor.double() for name, tensor in state.items()})
    inputs = torch.randint(1, config.vocab_size, (4, config.max_len), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(inputs)


def test_project_after_lift_returns_narrow_model():
    narrow = randomised_state(TransformerClassifier(NARROW), seed=0)
    maps = duplicating_maps(seed=1)
    lifted = lift(narrow, alignment_spec(NARROW), maps)

    projected = project(lifted, alignment_spec(WIDE), alignment_spec(NARROW), maps)

    for name, tensor in narrow.items():
        torch.testing.assert_close(projected[name].double(), tensor.double(), atol=1e-6, rtol=0)


def test_lift_keeps_function_and_projection_round_trips_wide_model():
    narrow = randomised_state(TransformerClassifier(NARROW), seed=2)
    maps = duplicating_maps(seed=3)
    wide = {name: tensor.float() for name, tensor in lift(narrow, alignment_spec(NARROW), maps).items()}
    torch.testing.assert_close(logits(WIDE, wide), logits(NARROW, narrow), atol=1e-5, rtol=0)

    back = lift(project(wide, alignment_spec(WIDE), alignment_spec(NARROW), maps), alignment_spec(NARROW), maps)

    for name, tensor in wide.items():
        torch.testing.assert_close(back[name].float(), tensor, atol=1e-6, rtol=0)


def test_engine_maps_project_the_fused_model_to_the_narrow_width():
    """The maps of a width-changing fusion project the fused model back to the client's width."""
    narrow = randomised_state(TransformerClassifier(NARROW), seed=4)
    wide = randomised_state(TransformerClassifier(WIDE), seed=5)
    result = fuse([narrow, wide], [alignment_spec(NARROW), alignment_spec(WIDE)],
                  options=FusionOptions(), reference=wide, reference_spec=alignment_spec(WIDE))
    projected = project(result.state_dict, alignment_spec(WIDE), alignment_spec(NARROW), result.maps[0])
    alignment_spec(NARROW).check_state_dict(projected, "projected")
    assert all(bool(torch.isfinite(tensor).all()) for tensor in projected.values())


def test_truncation_keeps_first_units():
    wide = randomised_state(TransformerClassifier(WIDE), seed=6)
    projected = project(wide, alignment_spec(WIDE), alignment_spec(NARROW),
                        truncation_maps(alignment_spec(NARROW), alignment_spec(WIDE)))
    torch.testing.assert_close(projected["blocks.0.mlp.fc1.weight"], wide["blocks.0.mlp.fc1.weight"][: NARROW.d_ff])
    torch.testing.assert_close(projected["blocks.1.mlp.fc2.weight"], wide["blocks.1.mlp.fc2.weight"][:, : NARROW.d_ff])


def test_map_of_wrong_width_is_rejected():
    wide = randomised_state(TransformerClassifier(WIDE), seed=7)
    maps = truncation_maps(alignment_spec(WIDE), alignment_spec(WIDE))
    with pytest.raises(SpecError, match="expected"):
        project(wide, alignment_spec(WIDE), alignment_spec(NARROW), maps)
