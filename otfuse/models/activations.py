"""Per-unit activations of a classifier on a probe batch, for activation-based ground costs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch

from otfuse.models.config import ModelConfig
from otfuse.models.encoder import PAD_ID, TransformerClassifier
from otfuse.models.spec import RESIDUAL, block_groups


@torch.no_grad()
def collect_activations(
    config: ModelConfig, state_dict: Mapping[str, torch.Tensor], input_ids: torch.Tensor
) -> dict[str, np.ndarray]:
    """Run the model in eval mode on ``input_ids`` and return each group's activations.

    Every entry has shape (units, samples), where a sample is one non-padding token. The
    residual stream is described by its values after the embeddings and after every block,
    concatenated, because one transport map serves the whole stream. Query/key units are
    described by their query and key outputs, value units by their value outputs, MLP units by
    the first MLP layer's output.
    """
    model = TransformerClassifier(config)
    model.load_state_dict(state_dict)
    model.eval()
    captured: dict[str, list[torch.Tensor]] = {RESIDUAL: []}
    keep = input_ids != PAD_ID

    def record(name: str):
        def hook(_module, _inputs, output):
            captured.setdefault(name, []).append(output[keep])

        return hook

    handles = [model.drop.register_forward_hook(record(RESIDUAL))]
    for layer, block in enumerate(model.blocks):
        qk, vo, mlp = block_groups(layer)
        handles += [
            block.attn.query.register_forward_hook(record(qk)),
            block.attn.key.register_forward_hook(record(qk)),
            block.attn.value.register_forward_hook(record(vo)),
            block.mlp.fc1.register_forward_hook(record(mlp)),
            block.register_forward_hook(record(RESIDUAL)),
        ]
    try:
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts).T.double().numpy() for name, parts in captured.items()}


def config_for_state_dict(base: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Return ``base`` with the widths and depth read off ``state_dict``'s shapes.

    Fused models may have widths other than the base config's (the anchor's), so activations
    are collected with a config that matches the weights at hand.
    """
    layers = 1 + max(int(name.split(".")[1]) for name in state_dict if name.startswith("blocks."))
    return dataclasses.replace(
        base,
        d_model=int(state_dict["tok_emb.weight"].shape[1]),
        d_ff=int(state_dict["blocks.0.mlp.fc1.weight"].shape[0]),
        n_layers=layers,
    )


def activation_fn(base: ModelConfig, input_ids: torch.Tensor):
    """Return a function from a state dict to its activations on ``input_ids``, for ``fuse``."""

    def activations_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return collect_activations(config_for_state_dict(base, state_dict), state_dict, input_ids)

    return activations_of
