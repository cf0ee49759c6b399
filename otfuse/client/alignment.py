"""Client-side alignment: a client moves its trained model into the global model's units itself.

Every client has the global model it received, so it can solve the transport problems
against it locally, with a ground cost from its own weights or from activations on its own
training texts, and reply with an already aligned model. The server then only computes a
weighted mean, which is what secure aggregation can compute, and no activations leave the
client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from otfuse import records
from otfuse.client.attack import is_attacker, poisoned_state
from otfuse.fusion import AlignmentSpec, FusionOptions, TransportMap, align_model
from otfuse.models import activation_fn
from otfuse.runconfig import (
    ATTACK_KIND,
    ATTACK_PARTITION,
    ATTACK_SCALE,
    CLIENT_ALIGNMENT_COST,
    CLIENT_ALIGNMENT_PROBE,
    FUSION_ALIGNMENT,
    FUSION_MASSES,
    FUSION_ON_PLAN_FAILURE,
    FUSION_REG,
    STRATEGY,
    RunConfig,
)
from otfuse.task import RunModel, ScratchTransformer

StateDict = Mapping[str, torch.Tensor]
ActivationFn = Callable[[StateDict], dict[str, np.ndarray]]


@dataclass
class ClientAlignment:
    """The aligned model (the received dtypes), the mean transport cost over groups, the maps."""

    state_dict: dict[str, torch.Tensor]
    transport_cost: float
    maps: dict[str, TransportMap] = field(repr=False)


def align_to_global(
    trained: StateDict,
    global_model: StateDict,
    spec: AlignmentSpec,
    options: FusionOptions,
    activation_fn: ActivationFn | None = None,
) -> ClientAlignment:
    """Align the locally trained model to the received global model.

    Parameters
    ----------
    trained, global_model : state dict
        This client's model after local training and the global model it started from; both
        match ``spec``.
    spec : AlignmentSpec
        Alignment spec of the exchanged tensors.
    options : FusionOptions
        Alignment and cost. With ``cost="activation"``, ``activation_fn`` maps a state dict
        to its activations on a probe batch of this client's own texts.

    Returns
    -------
    ClientAlignment
        ``transport_cost`` is the mean over groups of each group's transport cost, the same
        score that :func:`otfuse.fusion.fuse` reports in ``model_costs``.

    Raises
    ------
    ValueError
        For ``cost="activation"`` without ``activation_fn``.
    """
    use_activations = options.cost == "activation" and options.alignment != "none"
    if use_activations and activation_fn is None:
        raise ValueError(
            "client-side alignment with cost='activation' needs an activation function; pass "
            "one or use cost='weight'"
        )
    if options.alignment == "none":
        identity = {name: TransportMap.identity(group.size) for name, group in spec.groups.items()}
        return ClientAlignment({name: tensor.clone() for name, tensor in trained.items()}, 0.0, identity)
    aligned, maps, diagnostics = align_model(
        trained, spec, global_model, spec, options,
        source_activations=activation_fn(trained) if use_activations else None,
        target_activations=activation_fn(global_model) if use_activations else None,
    )
    state = {name: aligned[name].to(tensor.dtype).contiguous() for name, tensor in trained.items()}
    cost = float(np.mean([record.transport_cost for record in diagnostics])) if diagnostics else 0.0
    return ClientAlignment(state, cost, maps)


def reply_state(
    config: RunConfig,
    task: RunModel,
    trained: StateDict,
    received: StateDict,
    train_ids: np.ndarray,
    partition_id: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Return the tensors a client sends and the extra metrics that describe them.

    With strategy ``otfusion-client`` the trained model is aligned to the received global
    model first, and its transport cost is reported as ``alignment_cost``. A poisoned
    partition (``attack.*``, benchmarks only) then scales or negates the tensors.
    """
    state = dict(trained)
    metrics: dict[str, float] = {}
    if config.get(STRATEGY) == "otfusion-client":
        options = FusionOptions(
            alignment=config.get(FUSION_ALIGNMENT),
            reg=config.get(FUSION_REG),
            masses=config.get(FUSION_MASSES),
            cost=config.get(CLIENT_ALIGNMENT_COST),
            on_plan_failure=config.get(FUSION_ON_PLAN_FAILURE),
        )
        probe = _probe_activations(config, task, train_ids) if options.cost == "activation" else None
        alignment = align_to_global(state, received, task.alignment_spec(), options, probe)
        state = alignment.state_dict
        metrics[records.ALIGNMENT_COST] = alignment.transport_cost
    kind = config.get(ATTACK_KIND)
    if is_attacker(kind, config.get(ATTACK_PARTITION), partition_id):
        state = poisoned_state(state, kind, config.get(ATTACK_SCALE))
    return state, metrics


def _probe_activations(config: RunConfig, task: RunModel, train_ids: np.ndarray) -> ActivationFn:
    if not isinstance(task, ScratchTransformer):
        raise ValueError(
            "client-alignment.cost='activation' supports the scratch transformer only; set "
            "client-alignment.cost=weight for a pretrained encoder"
        )
    count = min(len(train_ids), config.get(CLIENT_ALIGNMENT_PROBE))
    if count == 0:
        raise ValueError("this partition has no training texts to probe activations with")
    return activation_fn(task.config, torch.as_tensor(np.asarray(train_ids[:count]), dtype=torch.long))
