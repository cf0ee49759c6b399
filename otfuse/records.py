"""Keys of the records that the ServerApp and the ClientApp exchange.

``arrays``, ``config``, ``num-examples`` and ``server-round`` are the keys that Flower's
``FedAvg`` uses. Metric names follow :mod:`otfuse.training` (``train_loss``); only the weight
key keeps Flower's hyphenated spelling. The two functions at the end convert between a
state dict and the unnamed array list of Flower's legacy ``Parameters``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SERVER_ROUND = "server-round"
#: Weight of FedProx's proximal term, which Flower's FedProx adds to every train config.
PROXIMAL_MU = "proximal-mu"
NUM_EXAMPLES = "num-examples"

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
TRAIN_SECONDS = "train_seconds"
#: Mean transport cost of a client-aligned model to the global model (strategy otfusion-client).
ALIGNMENT_COST = "alignment_cost"

EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
EVAL_F1_WEIGHTED = "eval_f1_weighted"


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    """Return the tensors of a state dict as numpy arrays, in the state dict's order.

    Flower's legacy ``Parameters``, which its SecAgg+ workflow uses, carry an unnamed list of
    arrays. Server and clients build the same model, so its state-dict order names the list.
    """
    return [tensor.detach().cpu().numpy() for tensor in state.values()]


def arrays_to_state(
    arrays: Sequence[np.ndarray], reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Name an unnamed list of arrays after ``reference`` and cast each to its dtype.

    Raises
    ------
    ValueError
        If the number of arrays or a shape differs from ``reference``, for example because
        server and client run with different model settings.
    """
    if len(arrays) != len(reference):
        raise ValueError(
            f"received {len(arrays)} arrays but this node's model has {len(reference)} "
            "exchanged tensors; run server and clients with the same model settings"
        )
    state = {}
    for (name, tensor), array in zip(reference.items(), arrays):
        if tuple(array.shape) != tuple(tensor.shape):
            raise ValueError(
                f"received array for {name!r} has shape {tuple(array.shape)}, expected "
                f"{tuple(tensor.shape)}; run server and clients with the same model settings"
            )
        state[name] = torch.as_tensor(np.asarray(array)).to(tensor.dtype)
    return state
