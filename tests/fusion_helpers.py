"""Helpers for fusion tests: random weights without ties, and symmetry permutations from a spec."""

from __future__ import annotations

import torch

from otfuse.fusion import AlignmentSpec, TransportMap
from otfuse.fusion.maps import apply_maps


def randomised_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Return the model's state dict with every tensor redrawn, so that no two units tie."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        scale = 1.0 if "ln" in name and name.endswith("weight") else 0.3
        base = 1.0 if "ln" in name and name.endswith("weight") else 0.0
        state[name] = base + scale * torch.randn(tensor.shape, generator=generator)
    return state


def random_symmetry(spec: AlignmentSpec, seed: int) -> dict[str, torch.Tensor]:
    """Draw one permutation per group: heads are permuted as wholes and units within each head.

    Tied groups (the query/key and value/output units of one attention layer) share the head
    permutation but get their own within-head permutations, which is a symmetry of attention.
    """
    generator = torch.Generator().manual_seed(seed)
    head_orders: dict[str, torch.Tensor] = {}
    orders = {}
    for name, group in spec.groups.items():
        if group.head_tie is not None:
            if group.head_tie not in head_orders:
                head_orders[group.head_tie] = torch.randperm(group.num_heads, generator=generator)
            head_order = head_orders[group.head_tie]
        else:
            head_order = torch.randperm(group.num_heads, generator=generator)
        size = group.head_size
        parts = [head * size + torch.randperm(size, generator=generator) for head in head_order.tolist()]
        orders[name] = torch.cat(parts)
    return orders


def permute_state(
    state: dict[str, torch.Tensor], spec: AlignmentSpec, orders: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return ``state`` with unit ``orders[g][j]`` of every group ``g`` moved to position ``j``."""
    maps = {}
    for name, order in orders.items():
        size = order.numel()
        plan = torch.zeros(size, size, dtype=torch.float64)
        plan[order, torch.arange(size)] = 1.0 / size
        maps[name] = TransportMap(plan)
    return {name: tensor.float() for name, tensor in apply_maps(state, spec, maps).items()}
