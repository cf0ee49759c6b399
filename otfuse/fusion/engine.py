"""Fuse N models of one architecture: align every model to a target, then average with weights."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from otfuse.fusion.align import Activations, GroupDiagnostics, align_model
from otfuse.fusion.errors import FusionInputError
from otfuse.fusion.maps import TransportMap
from otfuse.fusion.options import FusionOptions
from otfuse.fusion.spec import AlignmentSpec, SpecError

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
ActivationFn = Callable[[StateDict], Activations]


@dataclass
class FusionResult:
    """The fused state dict (the target's shapes and dtypes) and what the alignment reported.

    ``model_costs`` holds, per input model, the mean transport cost over its groups in the
    last alignment: how far the model's units are from the target's (0 for the anchor).
    ``maps`` holds, per input model, its transport map of every group.
    """

    state_dict: dict[str, torch.Tensor]
    diagnostics: list[GroupDiagnostics]
    model_costs: list[float]
    seconds: float
    maps: list[dict[str, TransportMap]] = field(default_factory=list, repr=False)

    @property
    def fallbacks(self) -> list[GroupDiagnostics]:
        """Diagnostics of the groups whose plan failed and that were averaged without alignment."""
        return [record for record in self.diagnostics if record.fallback is not None]


def fuse(
    models: Sequence[StateDict],
    specs: AlignmentSpec | Sequence[AlignmentSpec],
    weights: Sequence[float] | None = None,
    options: FusionOptions | None = None,
    *,
    reference: StateDict | None = None,
    reference_spec: AlignmentSpec | None = None,
    activation_fn: ActivationFn | None = None,
) -> FusionResult:
    """Align the models' units with optimal transport and return their weighted average.

    Parameters
    ----------
    models : sequence of state dicts
        Parameters of N models of one architecture family; widths may differ.
    specs : AlignmentSpec or sequence of AlignmentSpec
        One spec for all models, or one per model (needed when widths differ).
    weights : sequence of float, optional
        Positive weight per model, for example its number of training examples. They are
        normalised to sum to 1 and applied once, to every tensor. Default: equal weights.
    options : FusionOptions, optional
        Alignment, regularisation, masses, anchor, barycenter iterations, cost.
    reference : state dict, optional
        Target coordinate system, for example the current global model in federated learning.
        Every model is aligned to it, and it is not averaged in. Without it the target is
        ``models[options.anchor]``, which is aligned by the identity.
    reference_spec : AlignmentSpec, optional
        Spec of ``reference``; defaults to the anchor's spec.
    activation_fn : callable, optional
        Required for ``options.cost == "activation"``: maps a state dict to its activations,
        one (units, samples) array per group, on a probe batch shared by all models.

    Returns
    -------
    FusionResult
        The fused state dict has the target's shapes and dtypes.

    Raises
    ------
    FusionInputError
        For an empty list, weights that are not positive and finite, NaN or infinite
        parameters, mismatched architectures, or an anchor out of range.
    SpecError
        If a state dict does not match its spec.
    FusionError
        If a transport plan fails its checks.

    Examples
    --------
    Plain weighted averaging is the same call with ``alignment="none"``:

    >>> import torch
    >>> from otfuse.fusion import FusionOptions, SpecBuilder, fuse
    >>> builder = SpecBuilder()
    >>> builder.add_group("hidden")
    >>> builder.linear("fc", out_group="hidden", in_group=None, bias=False)
    >>> spec = builder.build({"fc.weight": (2, 1)})
    >>> a, b = {"fc.weight": torch.tensor([[1.0], [2.0]])}, {"fc.weight": torch.tensor([[3.0], [4.0]])}
    >>> fuse([a, b], spec, options=FusionOptions(alignment="none")).state_dict["fc.weight"].flatten().tolist()
    [2.0, 3.0]

    Hard alignment matches the permuted units first:

    >>> b = {"fc.weight": torch.tensor([[2.0], [1.0]])}
    >>> fuse([a, b], spec).state_dict["fc.weight"].flatten().tolist()
    [1.0, 2.0]
    """
    started = time.perf_counter()
    options = options or FusionOptions()
    models = _as_tensor_dicts(models)
    spec_list = _spec_list(specs, len(models))
    weight_vector = _normalised_weights(weights, len(models))
    if options.anchor >= len(models):
        raise FusionInputError(
            f"anchor {options.anchor} is out of range for {len(models)} models; use 0 to {len(models) - 1}"
        )
    if options.cost == "activation" and options.alignment != "none" and activation_fn is None:
        raise FusionInputError("cost='activation' needs activation_fn; pass one or use cost='weight'")

    if reference is not None:
        target = _as_tensor_dicts([reference], label="reference")[0]
        target_spec = reference_spec or spec_list[options.anchor]
        target_spec.check_state_dict(target, "reference model")
        anchor = None
    else:
        target, target_spec, anchor = models[options.anchor], spec_list[options.anchor], options.anchor
    for index, (model, spec) in enumerate(zip(models, spec_list)):
        spec.check_state_dict(model, f"model {index}")
        target_spec.check_compatible(spec, f"model {index}")
        if options.alignment == "none":
            _check_same_shapes(model, target, index)

    aligned, maps, diagnostics, costs = _align_all(
        models, spec_list, target, target_spec, options, anchor, activation_fn
    )
    fused = _weighted_sum(aligned, weight_vector, target)
    for iteration in range(options.barycenter_iters):
        aligned, maps, diagnostics, costs = _align_all(
            models, spec_list, fused, target_spec, options, None, activation_fn
        )
        fused = _weighted_sum(aligned, weight_vector, target)
        logger.debug("barycenter iteration %d: mean transport cost %.4g", iteration + 1, float(np.mean(costs)))

    seconds = time.perf_counter() - started
    logger.debug("fused %d models in %.2f s (alignment=%s)", len(models), seconds, options.alignment)
    return FusionResult(state_dict=fused, diagnostics=diagnostics, model_costs=costs, seconds=seconds, maps=maps)


def _align_all(
    models: list[dict[str, torch.Tensor]],
    specs: list[AlignmentSpec],
    target: StateDict,
    target_spec: AlignmentSpec,
    options: FusionOptions,
    anchor: int | None,
    activation_fn: ActivationFn | None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, TransportMap]], list[GroupDiagnostics], list[float]]:
    use_activations = options.cost == "activation" and options.alignment != "none"
    target_activations = activation_fn(target) if use_activations else None
    aligned, maps, diagnostics, costs = [], [], [], []
    for index, (model, spec) in enumerate(zip(models, specs)):
        if index == anchor or options.alignment == "none":
            identity = {name: TransportMap.identity(group.size) for name, group in spec.groups.items()}
            aligned.append(_as_float64(model))
            maps.append(identity)
            costs.append(0.0)
            continue
        model_aligned, model_maps, model_diagnostics = align_model(
            model, spec, target, target_spec, options,
            source_activations=activation_fn(model) if use_activations else None,
            target_activations=target_activations,
            model_index=index,
        )
        aligned.append(model_aligned)
        maps.append(model_maps)
        diagnostics.extend(model_diagnostics)
        costs.append(float(np.mean([d.transport_cost for d in model_diagnostics])))
    return aligned, maps, diagnostics, costs


def _weighted_sum(
    aligned: list[dict[str, torch.Tensor]], weights: np.ndarray, template: StateDict
) -> dict[str, torch.Tensor]:
    """Apply the model weights, the one place they are used, to every tensor."""
    fused = {}
    for name, like in template.items():
        total = sum(float(w) * model[name] for w, model in zip(weights, aligned))
        fused[name] = total.to(like.dtype)
    return fused


def _as_float64(model: StateDict) -> dict[str, torch.Tensor]:
    return {name: tensor.double() for name, tensor in model.items()}


def _as_tensor_dicts(models: Sequence[StateDict], label: str = "model") -> list[dict[str, torch.Tensor]]:
    if isinstance(models, Mapping) or not isinstance(models, Sequence):
        raise FusionInputError("models must be a list of state dicts, one per model")
    if len(models) == 0:
        raise FusionInputError("no models to fuse; pass at least one state dict")
    converted = []
    for index, model in enumerate(models):
        name = label if label == "reference" else f"{label} {index}"
        if not isinstance(model, Mapping):
            raise FusionInputError(f"{name} is a {type(model).__name__}, expected a state dict (a mapping of tensors)")
        tensors = {}
        for key, value in model.items():
            tensor = torch.as_tensor(value)
            if not tensor.is_floating_point():
                raise FusionInputError(f"{name}: tensor {key!r} has dtype {tensor.dtype}; only floating-point tensors can be fused")
            if not bool(torch.isfinite(tensor).all()):
                raise FusionInputError(f"{name}: tensor {key!r} contains NaN or infinite values; drop this model or fix its training")
            tensors[key] = tensor.detach().cpu()
        converted.append(tensors)
    return converted


def _spec_list(specs: AlignmentSpec | Sequence[AlignmentSpec], count: int) -> list[AlignmentSpec]:
    if isinstance(specs, AlignmentSpec):
        return [specs] * count
    spec_list = list(specs)
    if len(spec_list) != count:
        raise FusionInputError(f"got {len(spec_list)} specs for {count} models; pass one spec or one per model")
    return spec_list


def _normalised_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    if weights is None:
        return np.full(count, 1.0 / count)
    values = list(weights)
    if len(values) != count:
        raise FusionInputError(f"got {len(values)} weights for {count} models; pass one weight per model")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise FusionInputError(f"weight {index} is {value!r}, expected a positive number")
        if not math.isfinite(float(value)) or float(value) <= 0:
            raise FusionInputError(
                f"weight {index} is {value!r}; weights must be positive and finite (for example sample counts)"
            )
    vector = np.asarray(values, dtype=np.float64)
    return vector / vector.sum()


def _check_same_shapes(model: StateDict, target: StateDict, index: int) -> None:
    for name, tensor in target.items():
        if tuple(model[name].shape) != tuple(tensor.shape):
            raise SpecError(
                f"model {index}: tensor {name!r} has shape {tuple(model[name].shape)}, the target "
                f"{tuple(tensor.shape)}; plain averaging needs equal widths, use hard or soft alignment"
            )
