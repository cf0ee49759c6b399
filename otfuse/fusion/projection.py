"""Move a model between widths with transport maps: lift a narrow model, project a wide one.

A source model of width ``n_source`` (per group) is aligned to a target of width ``n_target``
with plans ``T`` of shape (n_source, n_target). :func:`~otfuse.fusion.maps.apply_maps` lifts
the source into the target's units: each target unit copies the source units sent to it
(column-normalised ``T`` on out axes) and the source units' outgoing weights are split over
their copies (row-normalised ``T`` on in axes). For a hard plan with uniform masses and
``n_target`` a multiple of ``n_source``, that keeps the function of an MLP layer.

:func:`project` is the way back, with the transposed plan ``T^T`` of shape
(n_target, n_source): each source unit takes the mean of the incoming weights of the target
units it was sent to, and the sum of their outgoing weights. Projecting a lifted model
therefore returns the original, and a server can send every narrow client the global model
projected to that client's width with the maps of its last fusion.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from otfuse.fusion.errors import FusionInputError
from otfuse.fusion.maps import TransportMap, apply_maps, transform_axis
from otfuse.fusion.spec import AlignmentSpec, SpecError

StateDict = Mapping[str, torch.Tensor]


def lift(
    state_dict: StateDict, source_spec: AlignmentSpec, maps: Mapping[str, TransportMap]
) -> dict[str, torch.Tensor]:
    """Return ``state_dict`` moved into the target's units (float64), as the engine aligns it."""
    source_spec.check_state_dict(state_dict, "narrow model")
    return apply_maps(state_dict, source_spec, maps)


def project(
    state_dict: StateDict,
    target_spec: AlignmentSpec,
    source_spec: AlignmentSpec,
    maps: Mapping[str, TransportMap],
) -> dict[str, torch.Tensor]:
    """Project a model of the target's widths to the source's widths with transposed maps.

    Parameters
    ----------
    state_dict : state dict
        A model with ``target_spec``'s shapes, for example the fused global model.
    target_spec, source_spec : AlignmentSpec
        Specs of the wide (target) and narrow (source) architectures; same groups and heads.
    maps : mapping of group name to TransportMap
        Plans of shape (n_source, n_target), for example ``FusionResult.maps[i]`` of the
        client whose width is ``source_spec``'s, or :func:`truncation_maps`.

    Returns
    -------
    dict of str to Tensor
        The projected tensors with ``source_spec``'s shapes and ``state_dict``'s dtypes.
        A target unit that no source unit was sent to (a zero row of ``T^T``) contributes
        nothing to the projection.

    Raises
    ------
    SpecError
        If ``state_dict`` does not match ``target_spec``, the specs differ in groups, or a
        map's shape does not match the two widths.
    """
    target_spec.check_state_dict(state_dict, "wide model")
    target_spec.check_compatible(source_spec, "narrow spec")
    matrices = {}
    for name, group in target_spec.groups.items():
        if name not in maps:
            raise SpecError(f"no transport map for group {name!r}; pass one map per group")
        plan = maps[name].plan.double()
        expected = (source_spec.groups[name].size, group.size)
        if tuple(plan.shape) != expected:
            raise SpecError(
                f"group {name!r}: map has shape {tuple(plan.shape)}, expected {expected} "
                "(narrow width, wide width); pass the maps of this client's own fusion"
            )
        transposed = plan.T
        matrices[name] = {
            "out": _normalise(transposed, dim=0),
            "in": _normalise(transposed, dim=1),
        }
    projected = {}
    for name, tensor in state_dict.items():
        if name not in target_spec.tensors:
            projected[name] = tensor.clone()
            continue
        result = tensor.double()
        for index, axis in target_spec.tensors[name].groups_on_axes():
            result = transform_axis(result, index, matrices[axis.group][axis.role])
        projected[name] = result.to(tensor.dtype)
    source_spec.check_state_dict(projected, "projected model")
    return projected


def truncation_maps(source_spec: AlignmentSpec, target_spec: AlignmentSpec) -> dict[str, TransportMap]:
    """Return maps that send source unit ``i`` to target unit ``i`` of every group.

    They serve before any fusion has produced maps: :func:`project` then keeps the first
    ``n_source`` units of each group (within each head for multi-head groups) and drops the
    rest.

    Raises
    ------
    FusionInputError
        If a source group is wider than the target group.
    """
    target_spec.check_compatible(source_spec, "narrow spec")
    maps = {}
    for name, group in target_spec.groups.items():
        source = source_spec.groups[name]
        if source.size > group.size:
            raise FusionInputError(
                f"group {name!r} has {source.size} units in the narrow model and {group.size} in "
                "the wide one; the narrow model must not be wider"
            )
        plan = torch.zeros(source.size, group.size, dtype=torch.float64)
        for head in range(group.num_heads):
            for unit in range(source.head_size):
                plan[head * source.head_size + unit, head * group.head_size + unit] = 1.0
        maps[name] = TransportMap(plan / plan.sum())
    return maps


def _normalise(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    totals = matrix.sum(dim, keepdim=True)
    return torch.where(totals > 0, matrix / totals.clamp_min(torch.finfo(matrix.dtype).tiny), 0.0)


__all__ = ["lift", "project", "truncation_maps"]
