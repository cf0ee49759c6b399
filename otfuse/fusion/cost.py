"""Ground costs and support masses from unit descriptors.

A *descriptor* is one row per unit: its incoming weights (weight-based cost) or its
activations on a probe batch (activation-based cost). Both costs use the same steps: rows are
normalised, the Euclidean distance between every source and target row is computed with a
matrix product, and the matrix is divided by its maximum.
"""

from __future__ import annotations

import torch

# Floor of an importance mass, as a fraction of the uniform mass 1/n. A unit with all-zero
# weights would otherwise get zero mass, which exact OT cannot transport from.
MASS_FLOOR = 1e-3
_EPS = 1e-12


def normalise_rows(rows: torch.Tensor) -> torch.Tensor:
    """Scale every row to unit Euclidean norm (an all-zero row stays zero)."""
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(_EPS)


def standardise_activations(rows: torch.Tensor) -> torch.Tensor:
    """Centre each unit's activations and divide by their standard deviation."""
    centred = rows - rows.mean(dim=1, keepdim=True)
    return centred / (centred.std(dim=1, keepdim=True) + 1e-9)


def pairwise_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (n_source, n_target) from ``|x|^2 + |y|^2 - 2 x y^T``."""
    squared = (
        source.pow(2).sum(1, keepdim=True)
        + target.pow(2).sum(1).unsqueeze(0)
        - 2.0 * source @ target.T
    )
    return squared.clamp_min(0.0).sqrt()


def ground_cost(source: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Return the max-normalised cost between source and target descriptors (float64).

    ``kind`` is ``"weight"`` (rows normalised to unit norm) or ``"activation"`` (rows
    standardised, then normalised).
    """
    source = source.double()
    target = target.double()
    if kind == "activation":
        source = standardise_activations(source)
        target = standardise_activations(target)
    cost = pairwise_distance(normalise_rows(source), normalise_rows(target))
    maximum = cost.max()
    return cost / maximum if maximum > 0 else cost


def support_masses(descriptor: torch.Tensor, kind: str) -> torch.Tensor:
    """Return masses summing to 1: uniform, or proportional to each row's norm, floored."""
    count = descriptor.shape[0]
    if kind == "uniform":
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    norms = descriptor.double().norm(dim=1)
    total = norms.sum()
    masses = norms / total if total > 0 else torch.full_like(norms, 1.0 / count)
    masses = masses.clamp_min(MASS_FLOOR / count)
    return masses / masses.sum()
