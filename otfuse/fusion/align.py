"""Align one model's units to a target model, group by group, following an alignment spec.

Residual-stream policy. Every skip connection ``x + f(x)`` adds a branch output to the
stream, so the map of the branch's output must equal the map of the stream, or the sum is
misaligned. This engine uses one map for the whole stream: the spec ties the embeddings,
every block's attention-output and MLP-output rows, every LayerNorm and the head's input to
one group, and that group's cost combines all of them (in the first sweep the embeddings,
LayerNorms and biases, which need no other map; in later sweeps also the output
projections). So the maps are combined in the cost, before solving, and every skip-add
uses the same map. A permuted copy of a model is then recovered exactly.

Imfeld et al. (2024) instead solve a new map at each output projection and average it with
the incoming stream map at each skip-add (their default ``mean`` policy). The average of two
permutations is no longer a permutation, so even hard alignment turns soft along the stream,
and the maps of later blocks disagree with those of earlier ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from otfuse.fusion.cost import ground_cost, support_masses
from otfuse.fusion.errors import FusionError, FusionInputError
from otfuse.fusion.maps import TransportMap, apply_maps, transform_axis
from otfuse.fusion.options import FusionOptions
from otfuse.fusion.solver import solve
from otfuse.fusion.spec import AlignmentSpec, GroupSpec

logger = logging.getLogger(__name__)

Activations = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class GroupDiagnostics:
    """Per-group record of one alignment: sizes, solver, cost, iterations, errors and time."""

    model: int
    group: str
    source_size: int
    target_size: int
    solver: str
    transport_cost: float
    iterations: int
    marginal_error: float
    identity_distance: float | None
    seconds: float
    fallback: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def solve_order(spec: AlignmentSpec) -> list[list[GroupSpec]]:
    """Group the spec's groups into solve units: tied groups share one unit, in spec order."""
    units: list[list[GroupSpec]] = []
    by_tie: dict[str, list[GroupSpec]] = {}
    for group in spec.groups.values():
        if group.head_tie is None:
            units.append([group])
        elif group.head_tie in by_tie:
            by_tie[group.head_tie].append(group)
        else:
            by_tie[group.head_tie] = [group]
            units.append(by_tie[group.head_tie])
    return units


def align_model(
    source: Mapping[str, torch.Tensor],
    source_spec: AlignmentSpec,
    target: Mapping[str, torch.Tensor],
    target_spec: AlignmentSpec,
    options: FusionOptions,
    *,
    source_activations: Activations | None = None,
    target_activations: Activations | None = None,
    model_index: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, TransportMap], list[GroupDiagnostics]]:
    """Compute a transport map for every group and move ``source`` into ``target``'s units.

    Returns the aligned tensors (float64, with the target's shapes), the maps by group and one
    diagnostics record per group (from the last sweep).
    """
    maps: dict[str, TransportMap] = {}
    diagnostics: dict[str, GroupDiagnostics] = {}
    for sweep in range(options.sweeps):
        for unit in solve_order(target_spec):
            started = time.perf_counter()
            descriptors = [
                _descriptors(group, source, source_spec, target, maps, sweep, options,
                             source_activations, target_activations)
                for group in unit
            ]
            fallback = None
            try:
                unit_maps, infos = _solve_unit(unit, source_spec, descriptors, options)
            except FusionError as error:
                unit_maps, infos = _identity_fallback(unit, source_spec, options, error, model_index)
                fallback = str(error)
            seconds = (time.perf_counter() - started) / len(unit)
            for group, (cost_value, iterations, error) in zip(unit, infos):
                transport = unit_maps[group.name]
                maps[group.name] = transport
                diagnostics[group.name] = GroupDiagnostics(
                    model=model_index,
                    group=group.name,
                    source_size=source_spec.groups[group.name].size,
                    target_size=group.size,
                    solver="emd" if options.alignment == "hard" else "sinkhorn_log",
                    transport_cost=cost_value,
                    iterations=iterations,
                    marginal_error=error,
                    identity_distance=transport.identity_distance(),
                    seconds=seconds,
                    fallback=fallback,
                )
                logger.debug("model %d group %s: %s", model_index, group.name, diagnostics[group.name])
    aligned = apply_maps(source, source_spec, maps)
    return aligned, maps, list(diagnostics.values())


def _identity_fallback(
    unit: list[GroupSpec],
    source_spec: AlignmentSpec,
    options: FusionOptions,
    error: FusionError,
    model_index: int,
) -> tuple[dict[str, TransportMap], list[tuple[float, int, float]]]:
    """Use identity maps for a unit whose plan failed, if ``options.on_plan_failure`` allows it.

    The identity map averages the unit's units position by position, as plain averaging does,
    so one failed layer does not break the fused model. It needs equal sizes.
    """
    sizes_differ = any(source_spec.groups[g.name].size != g.size for g in unit)
    if options.on_plan_failure != "average" or sizes_differ:
        raise error
    logger.warning(
        "model %d: %s; using plain averaging for %s instead",
        model_index, error, ", ".join(g.name for g in unit),
    )
    maps = {group.name: TransportMap.identity(group.size) for group in unit}
    return maps, [(float("nan"), 0, 0.0) for _ in unit]


def _descriptors(
    group: GroupSpec,
    source: Mapping[str, torch.Tensor],
    source_spec: AlignmentSpec,
    target: Mapping[str, torch.Tensor],
    maps: Mapping[str, TransportMap],
    sweep: int,
    options: FusionOptions,
    source_activations: Activations | None,
    target_activations: Activations | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (source, target) descriptor rows of ``group``'s units.

    Weight-based: each unit is the concatenation, over every tensor that produces the group,
    of its slice of that tensor, after the tensor's other axes were moved to the target's
    units with the maps solved so far. In the first sweep a tensor whose other axes are not
    solved yet is left out, on both sides.
    """
    if options.cost == "activation":
        return _activation_descriptors(group.name, source_activations, target_activations)
    source_blocks, target_blocks = [], []
    for tensor_spec, index, axis in source_spec.tensors_of(group.name):
        if axis.role != "out":
            continue
        others = [(i, a) for i, a in tensor_spec.groups_on_axes() if i != index]
        if any(a.group not in maps for _, a in others):
            if sweep == 0:
                continue
        moved = source[tensor_spec.name].double()
        for other_index, other_axis in others:
            moved = transform_axis(moved, other_index, maps[other_axis.group].matrix(other_axis.role))
        source_blocks.append(moved.movedim(index, 0).reshape(moved.shape[index], -1))
        reference = target[tensor_spec.name].double()
        target_blocks.append(reference.movedim(index, 0).reshape(reference.shape[index], -1))
    return torch.cat(source_blocks, 1), torch.cat(target_blocks, 1)


def _activation_descriptors(
    group: str, source: Activations | None, target: Activations | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if source is None or target is None or group not in source or group not in target:
        raise FusionInputError(
            f"activation-based cost needs activations of group {group!r} for every model; "
            "pass an activation_fn that returns one (units, samples) array per group"
        )
    source_rows = torch.as_tensor(np.asarray(source[group]), dtype=torch.float64)
    target_rows = torch.as_tensor(np.asarray(target[group]), dtype=torch.float64)
    if source_rows.shape[1] != target_rows.shape[1]:
        raise FusionInputError(
            f"group {group!r}: activations have {source_rows.shape[1]} and {target_rows.shape[1]} "
            "samples; compute every model's activations on the same probe batch"
        )
    return source_rows, target_rows


def _solve_unit(
    unit: list[GroupSpec],
    source_spec: AlignmentSpec,
    descriptors: list[tuple[torch.Tensor, torch.Tensor]],
    options: FusionOptions,
) -> tuple[dict[str, TransportMap], list[tuple[float, int, float]]]:
    """Solve the maps of one unit: a single group, or the tied groups of one attention layer."""
    costs, source_masses, target_masses = [], [], []
    for source_rows, target_rows in descriptors:
        costs.append(ground_cost(source_rows, target_rows, options.cost).numpy())
        source_masses.append(support_masses(source_rows, options.masses).numpy())
        target_masses.append(support_masses(target_rows, options.masses).numpy())

    if len(unit) == 1 and unit[0].num_heads == 1:
        (group,) = unit
        plan, info = solve(costs[0], source_masses[0], target_masses[0], options.alignment,
                           options.reg, group.name, options.max_sinkhorn_iters)
        return {group.name: TransportMap(torch.from_numpy(plan))}, [(info.cost, info.iterations, info.marginal_error)]
    return _solve_heads(unit, source_spec, costs, source_masses, target_masses, options)


def _solve_heads(
    unit: list[GroupSpec],
    source_spec: AlignmentSpec,
    costs: list[np.ndarray],
    source_masses: list[np.ndarray],
    target_masses: list[np.ndarray],
    options: FusionOptions,
) -> tuple[dict[str, TransportMap], list[tuple[float, int, float]]]:
    """Solve head-structured groups: units move only within matched heads, heads move as wholes.

    For every pair of heads (h, h') and every group of the unit, a small problem matches the
    units of source head h to those of target head h', with the group's masses renormalised
    within each head. The head-level cost of (h, h') is the sum of these transport costs over
    the unit's groups, and one head-level plan P (uniform head masses) is solved from it, so
    that the query/key and value/output units of a head move together. The full plan of each
    group is ``P[h, h'] * plan_{h, h'}`` on block (h, h'). Without ``match_heads``, P is the
    identity and only pairs (h, h) are solved.
    """
    heads = unit[0].num_heads
    pairs = (
        [(h, g) for h in range(heads) for g in range(heads)]
        if options.match_heads
        else [(h, h) for h in range(heads)]
    )
    block_plans: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in unit]
    head_cost = np.zeros((heads, heads))
    iterations = [0] * len(unit)
    errors = [0.0] * len(unit)
    for member, group in enumerate(unit):
        source_size = source_spec.groups[group.name].head_size
        target_size = group.head_size
        for h, g in pairs:
            rows = slice(h * source_size, (h + 1) * source_size)
            cols = slice(g * target_size, (g + 1) * target_size)
            a = source_masses[member][rows] / source_masses[member][rows].sum()
            b = target_masses[member][cols] / target_masses[member][cols].sum()
            plan, info = solve(costs[member][rows, cols], a, b, options.alignment, options.reg,
                               f"{group.name} head {h}->{g}", options.max_sinkhorn_iters)
            block_plans[member][h, g] = plan
            head_cost[h, g] += info.cost
            iterations[member] += info.iterations
            errors[member] = max(errors[member], info.marginal_error)

    uniform = np.full(heads, 1.0 / heads)
    if options.match_heads:
        head_plan, head_info = solve(head_cost, uniform, uniform, options.alignment, options.reg,
                                     f"{unit[0].head_tie} heads", options.max_sinkhorn_iters)
    else:
        head_plan = np.diag(uniform)

    maps: dict[str, TransportMap] = {}
    infos = []
    for member, group in enumerate(unit):
        source_size = source_spec.groups[group.name].head_size
        target_size = group.head_size
        plan = np.zeros((heads * source_size, heads * target_size))
        for (h, g), block in block_plans[member].items():
            plan[h * source_size:(h + 1) * source_size, g * target_size:(g + 1) * target_size] = (
                head_plan[h, g] * block
            )
        maps[group.name] = TransportMap(torch.from_numpy(plan))
        infos.append((float(np.sum(plan * costs[member])), iterations[member], errors[member]))
    return maps, infos
