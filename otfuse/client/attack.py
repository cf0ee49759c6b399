"""Poisoned clients for robustness benchmarks and tests; never part of a real deployment.

The run-config keys ``attack.partition``, ``attack.kind`` and ``attack.scale`` make one
partition misbehave, so that robust strategies can be compared on a known bad client:

* ``"scale"`` multiplies every tensor of the reply by ``attack.scale``;
* ``"sign-flip"`` multiplies every tensor of the reply by -1;
* ``"label-flip"`` trains on flipped labels (class ``c`` becomes ``n_classes - 1 - c``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

ATTACK_KINDS = ("none", "scale", "sign-flip", "label-flip")


def is_attacker(kind: str, attacker_partition: int, partition_id: int) -> bool:
    """Return whether this partition is the run's poisoned client."""
    return kind != "none" and attacker_partition == partition_id


def poisoned_labels(labels: np.ndarray, kind: str, n_classes: int) -> np.ndarray:
    """Return the labels to train on: flipped for ``"label-flip"``, else unchanged."""
    if kind != "label-flip":
        return labels
    return (n_classes - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)


def poisoned_state(state_dict: Mapping[str, torch.Tensor], kind: str, scale: float) -> dict[str, torch.Tensor]:
    """Return the tensors to send: scaled for ``"scale"``, negated for ``"sign-flip"``."""
    factor = {"scale": float(scale), "sign-flip": -1.0}.get(kind)
    if factor is None:
        return dict(state_dict)
    return {name: tensor * factor for name, tensor in state_dict.items()}
