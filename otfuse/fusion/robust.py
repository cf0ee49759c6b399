"""Transport cost as an anomaly score: flag outlying models and re-weight the fused average.

Aligning a model to the target yields its mean transport cost (``FusionResult.model_costs``)
at no extra cost. A model whose units are far from the target's, for example one with flipped
signs or one trained on corrupted labels, has a cost well above the others. The rule here is
the one-sided modified z-score of Iglewicz and Hoaglin ("How to Detect and Handle Outliers",
1993), which uses the median and the median absolute deviation (MAD), so that one extreme
score does not hide itself by inflating a mean or a standard deviation.

The ground cost normalises every unit's descriptor to unit norm, so a model whose weights are
all multiplied by a positive factor has the same cost as the unscaled model. Scaling attacks
need a norm check on the update; this score does not see them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from otfuse.fusion.errors import FusionInputError
from otfuse.fusion.maps import TransportMap, apply_maps
from otfuse.fusion.spec import AlignmentSpec

ROBUST_MODES = ("none", "drop", "downweight")

#: Scales the MAD to the standard deviation of a normal distribution (1 / 1.4826).
MAD_TO_SIGMA = 0.6745
#: Modified z-score above which Iglewicz and Hoaglin call a value an outlier.
DEFAULT_THRESHOLD = 3.5
#: The rule needs a median of at least this many scores to say what is typical.
MIN_MODELS = 3
#: The MAD is floored at this fraction of the median score. Identical clients give a MAD near
#: zero, and the floor keeps a cost 1 % above the others from counting as an outlier.
MAD_FLOOR_FRACTION = 0.05


@dataclass(frozen=True)
class OutlierDecision:
    """Scores, the statistics of the rule, and the resulting weight factor per model.

    ``z_scores[i]`` is ``MAD_TO_SIGMA * (scores[i] - median) / mad``; a model is flagged when
    it exceeds ``threshold``. ``factors[i]`` multiplies model ``i``'s fusion weight: 1 for a
    model that is not flagged, 0 in mode ``"drop"``, ``threshold / z_scores[i]`` in mode
    ``"downweight"``.
    """

    scores: list[float]
    median: float
    mad: float
    threshold: float
    z_scores: list[float]
    flagged: list[int] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)


def flag_outliers(
    scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD, mode: str = "drop"
) -> OutlierDecision:
    """Flag the models whose score is an upward outlier by the modified z-score rule.

    Parameters
    ----------
    scores : sequence of float
        Anomaly score per model, such as ``FusionResult.model_costs`` against a shared
        reference model. Only high scores count: a model closer than usual is not suspect.
    threshold : float
        Modified z-score above which a model is flagged; 3.5 by default.
    mode : {"none", "drop", "downweight"}
        What a flag does to the model's weight factor: nothing, 0, or ``threshold / z``.

    Returns
    -------
    OutlierDecision
        With fewer than :data:`MIN_MODELS` scores nothing is flagged.

    Examples
    --------
    >>> flag_outliers([0.10, 0.11, 0.12, 0.45]).flagged
    [3]
    """
    if mode not in ROBUST_MODES:
        raise FusionInputError(f"unknown robust mode {mode!r}; choose one of {', '.join(ROBUST_MODES)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise FusionInputError(f"threshold must be a positive number, got {threshold!r}; 3.5 is usual")
    values = np.asarray([float(score) for score in scores], dtype=np.float64)
    if not np.isfinite(values).all():
        raise FusionInputError(f"scores must be finite, got {values.tolist()}")
    count = len(values)
    if count < MIN_MODELS:
        median = float(np.median(values)) if count else 0.0
        return OutlierDecision(
            scores=values.tolist(), median=median, mad=0.0, threshold=float(threshold),
            z_scores=[0.0] * count, flagged=[], factors=[1.0] * count,
        )
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    mad = max(mad, MAD_FLOOR_FRACTION * abs(median), np.finfo(np.float64).tiny)
    z_scores = MAD_TO_SIGMA * (values - median) / mad
    flagged = [index for index, z in enumerate(z_scores) if z > threshold]
    factors = []
    for index, z in enumerate(z_scores):
        if index not in flagged or mode == "none":
            factors.append(1.0)
        elif mode == "drop":
            factors.append(0.0)
        else:
            factors.append(float(threshold / z))
    return OutlierDecision(
        scores=values.tolist(), median=median, mad=mad, threshold=float(threshold),
        z_scores=[float(z) for z in z_scores], flagged=flagged, factors=factors,
    )


def reweighted_average(
    models: Sequence[Mapping[str, torch.Tensor]],
    specs: AlignmentSpec | Sequence[AlignmentSpec],
    maps: Sequence[Mapping[str, TransportMap]],
    weights: Sequence[float],
    template: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Average the models in the target's units with new weights, reusing their transport maps.

    ``maps`` are ``FusionResult.maps`` of a previous :func:`~otfuse.fusion.fuse` call, so no
    transport problem is solved again. Weights may be 0 (a dropped model) but not all of them;
    they are normalised to sum to 1. The result has ``template``'s names and dtypes.
    """
    spec_list = [specs] * len(models) if isinstance(specs, AlignmentSpec) else list(specs)
    if not len(models) == len(spec_list) == len(maps) == len(weights):
        raise FusionInputError(
            f"got {len(models)} models, {len(spec_list)} specs, {len(maps)} map sets and "
            f"{len(weights)} weights; pass one of each per model"
        )
    vector = np.asarray([float(weight) for weight in weights], dtype=np.float64)
    if not np.isfinite(vector).all() or (vector < 0).any() or not vector.sum() > 0:
        raise FusionInputError(
            f"weights must be finite, non-negative and not all 0, got {vector.tolist()}"
        )
    vector = vector / vector.sum()
    fused: dict[str, torch.Tensor] = {}
    for model, spec, model_maps, weight in zip(models, spec_list, maps, vector):
        if weight == 0:
            continue
        aligned = apply_maps(model, spec, model_maps)
        for name in template:
            tensor = aligned[name] if name in aligned else model[name].double()
            fused[name] = fused[name] + float(weight) * tensor if name in fused else float(weight) * tensor
    return {name: fused[name].to(like.dtype) for name, like in template.items()}


def combined_factors(weights: Sequence[float], decision: OutlierDecision) -> list[float]:
    """Return ``weights`` multiplied by the decision's factors (0 for a dropped model)."""
    return [float(weight) * factor for weight, factor in zip(weights, decision.factors)]


__all__ = [
    "DEFAULT_THRESHOLD",
    "MAD_FLOOR_FRACTION",
    "MIN_MODELS",
    "ROBUST_MODES",
    "OutlierDecision",
    "combined_factors",
    "flag_outliers",
    "reweighted_average",
]
