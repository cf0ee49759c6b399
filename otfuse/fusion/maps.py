"""Transport maps and how they act on tensor axes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from otfuse.fusion.spec import AlignmentSpec, SpecError


@dataclass
class TransportMap:
    """A plan ``T`` of shape (n_source, n_target) and its two normalised forms.

    Out axes use the column-normalised plan, so every target unit is a convex combination
    (a weighted average) of the source units sent to it. In axes use the row-normalised plan,
    so the contributions of source units merged into one target unit add up. For equal widths
    and uniform masses both equal ``n * T``; for different widths they differ, and using one
    scaling for both sides (as the reference code does) changes the network's function.
    """

    plan: torch.Tensor
    _by_role: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def identity(cls, size: int) -> TransportMap:
        return cls(torch.eye(size, dtype=torch.float64) / size)

    def matrix(self, role: str) -> torch.Tensor:
        if role not in self._by_role:
            if role == "out":
                self._by_role[role] = self.plan / self.plan.sum(0, keepdim=True)
            else:
                self._by_role[role] = self.plan / self.plan.sum(1, keepdim=True)
        return self._by_role[role]

    def identity_distance(self) -> float | None:
        """Fraction of the mass that leaves the diagonal (0 for the identity), or None if not square."""
        rows, cols = self.plan.shape
        if rows != cols:
            return None
        return float(1.0 - torch.diagonal(self.plan).sum() / self.plan.sum())


def transform_axis(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Contract ``tensor``'s ``axis`` (n_source entries) with ``matrix`` (n_source, n_target)."""
    moved = tensor.movedim(axis, -1)
    return (moved @ matrix).movedim(-1, axis)


def apply_maps(
    state_dict: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    maps: Mapping[str, TransportMap],
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Return float64 copies of the tensors with every group axis moved to the target's units."""
    aligned = {}
    for name in names if names is not None else spec.tensors:
        tensor = state_dict[name].double()
        for index, axis in spec.tensors[name].groups_on_axes():
            if axis.group not in maps:
                raise SpecError(f"tensor {name!r}: no transport map for group {axis.group!r}")
            tensor = transform_axis(tensor, index, maps[axis.group].matrix(axis.role))
        aligned[name] = tensor
    return aligned
