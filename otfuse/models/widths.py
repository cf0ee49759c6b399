"""Narrower versions of the transformer: width factors, scaled configs, widths read off tensors.

A client with little compute can train a model whose MLP width ``d_ff`` and residual width
``d_model`` are a fraction of the global model's. Depth, heads, vocabulary, sequence length
and classes stay those of the global model, so the fusion engine can align the narrow model
to the wide one group by group.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from otfuse.models.config import ModelConfig

#: Tensors whose shapes give the two widths of a model: (vocab, d_model) and (d_ff, d_model).
EMBEDDING_TENSOR = "tok_emb.weight"
MLP_TENSOR = "blocks.0.mlp.fc1.weight"


def parse_width_factors(text: str) -> tuple[float, ...]:
    """Return the factors of a comma-separated list such as ``"1.0,0.5"``; empty gives ().

    Raises
    ------
    ValueError
        If an item is not a number in (0, 1]; the message names the item.
    """
    factors = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"width factor {item!r} is not a number") from None
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"width factor {item!r} is outside (0, 1]")
        factors.append(value)
    return tuple(factors)


def scaled_config(base: ModelConfig, factor: float) -> ModelConfig:
    """Return ``base`` with ``d_ff`` and ``d_model`` scaled by ``factor``.

    ``d_ff`` is rounded to the nearest integer and ``d_model`` to the nearest multiple of
    ``n_heads``. Neither drops below its smallest valid value: 1 unit, and one unit per head.
    A factor of 1 returns ``base`` itself.
    """
    if factor == 1.0:
        return base
    heads = base.n_heads
    d_model = max(heads, heads * round(base.d_model * factor / heads))
    d_ff = max(1, round(base.d_ff * factor))
    return dataclasses.replace(base, d_model=d_model, d_ff=d_ff)


def read_widths(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """Return ``(d_model, d_ff)`` read off the embedding and first MLP tensor, or None.

    None means the tensors are missing or not 2-D, so the widths cannot be read.
    """
    embedding, mlp = state_dict.get(EMBEDDING_TENSOR), state_dict.get(MLP_TENSOR)
    if not isinstance(embedding, torch.Tensor) or not isinstance(mlp, torch.Tensor):
        return None
    if embedding.dim() != 2 or mlp.dim() != 2:
        return None
    return int(embedding.shape[1]), int(mlp.shape[0])


def narrower_config(base: ModelConfig, d_model: int, d_ff: int) -> ModelConfig:
    """Return ``base`` with the given widths, checked to be a valid narrower version of it.

    Raises
    ------
    ValueError
        If a width is below 1 or above ``base``'s, or ``d_model`` is not a multiple of
        ``n_heads``.
    """
    if not 1 <= d_model <= base.d_model or not 1 <= d_ff <= base.d_ff:
        raise ValueError(
            f"widths d_model={d_model}, d_ff={d_ff} are not between 1 and the global model's "
            f"d_model={base.d_model}, d_ff={base.d_ff}"
        )
    if d_model % base.n_heads:
        raise ValueError(f"d_model={d_model} is not a multiple of the {base.n_heads} heads")
    return dataclasses.replace(base, d_model=d_model, d_ff=d_ff)


__all__ = [
    "narrower_config",
    "parse_width_factors",
    "read_widths",
    "scaled_config",
]
