"""The ClientApp's side of Flower's SecAgg+ secure aggregation (``secagg.enabled = true``).

In flwr 1.42 SecAgg+ exists only for the legacy strategy API. The server's
``SecAggPlusWorkflow`` sends four train messages per round, each with a ``secaggplus``
config record; Flower's ``secaggplus_mod`` handles the key exchange and unmasking stages
itself and calls the train handler once, with the global model in the legacy ``fitins``
records. It then reads the reply as a legacy ``FitRes``, quantises the weights (times the
client's share ``num_examples / max_weight``), masks them and sends only the masked integers.

:func:`secagg_when_requested` applies that mod to SecAgg+ messages only, so ordinary train
messages of the Message-API strategies reach the handler unchanged.
:func:`train_legacy` trains and aligns exactly as the ``otfusion-client`` path of
:func:`otfuse.client.local_update.local_update` does, and replies in the legacy format.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from otfuse import records
from otfuse.client.local_update import local_update
from otfuse.runconfig import SECAGG_CLIPPING_RANGE, SECAGG_MAX_WEIGHT, RunConfig, load_run_config
from otfuse.task import run_model

#: The ArrayRecord of a legacy train instruction, as ``compat.fitins_to_recorddict`` names it.
LEGACY_FITINS_ARRAYS = "fitins.parameters"


def secagg_when_requested(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's ``secaggplus_mod`` on SecAgg+ train messages, pass every other one on.

    ``secaggplus_mod`` expects the ``secaggplus`` config record in every train message passed
    to it, so it cannot wrap the Message-API train messages directly.
    """
    is_train = msg.metadata.message_type == MessageType.TRAIN
    if is_train and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def carries_legacy_fitins(msg: Message) -> bool:
    """Tell whether a train message is a legacy ``fitins`` instruction of the SecAgg+ workflow."""
    return LEGACY_FITINS_ARRAYS in msg.content.array_records


def train_legacy(msg: Message, context: Context) -> Message:
    """Train and align as ``otfusion-client`` does, and reply with a legacy ``FitRes``."""
    config = load_run_config(context.run_config)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    task = run_model(config)
    reference = task.exchanged_state(task.build())
    received = records.arrays_to_state(parameters_to_ndarrays(fitins.parameters), reference)
    update = local_update(config, context, received, int(fitins.config[records.SERVER_ROUND]))
    check_clipping(update.state, update.num_examples, config)
    state = {name: update.state[name] for name in reference}
    fitres = FitRes(
        status=Status(code=Code.OK, message="trained and aligned"),
        parameters=ndarrays_to_parameters(records.state_to_arrays(state)),
        num_examples=update.num_examples,
        metrics=dict(update.metrics),
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def check_clipping(state: Mapping[str, torch.Tensor], num_examples: int, config: RunConfig) -> None:
    """Raise if SecAgg+ would clip a weight of this reply.

    ``secaggplus_mod`` multiplies the weights by ``num_examples / secagg.max-weight`` and
    clips the products to ``secagg.clipping-range`` before it quantises them. A clipped
    weight would corrupt the average without any sign, so the client fails instead and
    SecAgg+ leaves it out of the round.

    Raises
    ------
    ValueError
        Naming the largest scaled weight and the settings that fix it.
    """
    share = num_examples / config.get(SECAGG_MAX_WEIGHT)
    largest = max(float(tensor.detach().abs().max()) for tensor in state.values())
    clipping_range = config.get(SECAGG_CLIPPING_RANGE)
    if not np.isfinite(largest) or largest * share > clipping_range:
        raise ValueError(
            f"a weight of magnitude {largest:.4g} times this client's share {num_examples} / "
            f"{config.get(SECAGG_MAX_WEIGHT):g} = {largest * share:.4g} exceeds "
            f"{SECAGG_CLIPPING_RANGE.key} = {clipping_range:g}, so SecAgg+ would clip it; set "
            f"{SECAGG_CLIPPING_RANGE.key} to at least {largest * share * 1.5:.3g}"
        )
