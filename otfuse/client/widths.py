"""This node's model width under ``client-width-factors``, and the received model at that width.

A node whose factor is below 1 trains a narrower transformer (see
:func:`otfuse.models.widths.scaled_config`). The server sends it the global model projected
to its width once it has fused a reply of the node, and the wide global model before that.
The node projects a wide model itself with truncation maps: it keeps the first units of
every group (within each head), which is all it can do without the server's transport maps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from otfuse.fusion.projection import project, truncation_maps
from otfuse.models import alignment_spec, parameter_shapes
from otfuse.models.widths import scaled_config
from otfuse.runconfig import RunConfig
from otfuse.task import RunModel, ScratchTransformer, run_model

StateDict = Mapping[str, torch.Tensor]


def node_model(config: RunConfig, partition_id: int) -> RunModel:
    """Return the model this partition trains: the run's model scaled by its width factor.

    Partition ``i`` gets factor ``i mod len(factors)``. Without factors, or with factor 1,
    it is :func:`otfuse.task.run_model`'s model unchanged.
    """
    task = run_model(config)
    factors = config.width_factors
    if not factors:
        return task
    factor = factors[partition_id % len(factors)]
    if factor == 1.0:
        return task
    # Run-config validation allows factors with the scratch transformer only.
    return ScratchTransformer(scaled_config(task.config, factor))


def received_state(config: RunConfig, task: RunModel, state_dict: StateDict) -> StateDict:
    """Return the received tensors at the width of ``task``'s model.

    A model already of that width, or any model when the run has no width factors, comes
    back as it is. A model of the global width is projected with truncation maps.

    Raises
    ------
    ValueError
        If the received shapes are neither this node's width nor the global width.
    """
    if not config.width_factors or not isinstance(task, ScratchTransformer):
        return state_dict
    own_shapes = parameter_shapes(task.config)
    if _shapes(state_dict) == own_shapes:
        return state_dict
    global_config = run_model(config).config
    if _shapes(state_dict) != parameter_shapes(global_config):
        raise ValueError(
            f"received model has neither this node's widths (d_model={task.config.d_model}, "
            f"d_ff={task.config.d_ff}) nor the global ones (d_model={global_config.d_model}, "
            f"d_ff={global_config.d_ff}); run server and clients with the same model.* and "
            "client-width-factors settings"
        )
    wide_spec, narrow_spec = alignment_spec(global_config), alignment_spec(task.config)
    return project(state_dict, wide_spec, narrow_spec, truncation_maps(narrow_spec, wide_spec))


def _shapes(state_dict: StateDict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state_dict.items()}


__all__ = ["node_model", "received_state"]
