"""Per-unit activations of a classifier on a probe batch, for activation-based ground costs."""

from __future__ import annotations

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
