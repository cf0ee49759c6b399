"""Server-side bookkeeping for clients narrower than the global model (``client-width-factors``).

The server cannot see a node's width factor: it learns a node's widths from the node's first
training reply. :class:`NodeProjections` then

* checks that a reply's shapes form a valid narrower version of the global architecture and
  gives the model the reply is checked against (its widths' projection of the global model);
* gives the fusion engine one alignment spec per reply;
* keeps, for every narrow node, the transport maps of the last fusion the node took part in;
* replaces the global model in a node's instruction by its projection to the node's widths
  with those maps (:func:`otfuse.fusion.projection.project`).

A node without maps (before its first fused reply) gets the wide global model and projects
it itself with truncation maps (:mod:`otfuse.client.widths`). A node that missed later rounds
keeps the maps of its last fusion. They stay valid because every fusion aligns to the
previous global model, so unit ``j`` of the global model keeps its meaning from round to round.

NOTE: checkpoints do not save the maps, so after ``resume-from`` every narrow node starts
again from truncation maps, and the resumed rounds can differ from an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common import log

from otfuse.fusion import AlignmentSpec, TransportMap
from otfuse.fusion.projection import project, truncation_maps
from otfuse.models import ModelConfig, alignment_spec
from otfuse.models.widths import EMBEDDING_TENSOR, narrower_config, read_widths
from otfuse.strategies.replies import ReplyError, TrainUpdate

StateDict = Mapping[str, torch.Tensor]
Widths = tuple[int, int]


class NodeProjections:
    """Widths, transport maps and projected global models of the narrow nodes of a run.

    Parameters
    ----------
    base : ModelConfig
        Config of the global model; narrow models differ from it only in ``d_model`` and
        ``d_ff``.
    """

    def __init__(self, base: ModelConfig) -> None:
        self.base = base
        self.global_widths: Widths = (base.d_model, base.d_ff)
        self.maps: dict[int, tuple[Widths, dict[str, TransportMap]]] = {}
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self._configs: dict[Widths, ModelConfig] = {self.global_widths: base}
        self._specs: dict[Widths, AlignmentSpec] = {}

    def spec(self, widths: Widths) -> AlignmentSpec:
        """Return the alignment spec of the model with ``widths`` (cached)."""
        if widths not in self._specs:
            self._specs[widths] = alignment_spec(self._config(widths))
        return self._specs[widths]

    def spec_of(self, state_dict: StateDict) -> AlignmentSpec:
        """Return the alignment spec of a checked model, read off its shapes."""
        widths = read_widths(state_dict)
        return self.spec(widths if widths is not None else self.global_widths)

    def reply_reference(
        self, node_id: int, state_dict: StateDict, global_state: StateDict
    ) -> StateDict:
        """Return the model that node ``node_id``'s reply is checked against.

        A reply with the global widths, or one whose widths cannot be read, is checked
        against ``global_state`` as without widths, so a malformed reply gets the same
        rejection as before. A narrower reply is checked against the model the node started
        from: what the server sent it, or the truncation of ``global_state``.

        Raises
        ------
        ReplyError
            If the reply's widths exceed the global ones or do not fit the heads.
        """
        widths = read_widths(state_dict)
        if widths is None or widths == self.global_widths:
            return global_state
        try:
            self._config(widths)
        except ValueError as error:
            raise ReplyError(node_id, f"not a narrower version of the global model: {error}",
                             EMBEDDING_TENSOR) from None
        sent = self._sent.get(node_id)
        if sent is not None and read_widths(sent) == widths:
            return sent
        return self._truncated(global_state, widths)

    def record(self, updates: Sequence[TrainUpdate], maps: Sequence[Mapping[str, TransportMap]]) -> None:
        """Keep the maps of this fusion for every narrow node among ``updates``."""
        for update, model_maps in zip(updates, maps, strict=True):
            widths = read_widths(update.state_dict)
            if widths is None or widths == self.global_widths:
                self.maps.pop(update.node_id, None)
            else:
                self.maps[update.node_id] = (widths, dict(model_maps))

    def instructions(
        self, messages: Iterable[Message], arrays: ArrayRecord, arrays_key: str, *, remember: bool
    ) -> list[Message]:
        """Return ``messages`` with the global model projected for every node that has maps.

        Nodes without maps keep their message. With ``remember``, the projections are kept
        as the models the nodes' training replies start from (:meth:`reply_reference`).
        """
        messages = list(messages)
        if remember:
            self._sent = {}
        if not any(message.metadata.dst_node_id in self.maps for message in messages):
            return messages
        global_state = arrays.to_torch_state_dict()
        rewritten, projected_count = [], 0
        for message in messages:
            node_id = message.metadata.dst_node_id
            if node_id not in self.maps:
                rewritten.append(message)
                continue
            widths, node_maps = self.maps[node_id]
            projected = project(global_state, self.spec(self.global_widths), self.spec(widths), node_maps)
            projected = {name: tensor.contiguous() for name, tensor in projected.items()}
            projected_count += 1
            if remember:
                self._sent[node_id] = projected
            content = RecordDict(dict(message.content.items()))
            content[arrays_key] = ArrayRecord(projected)
            rewritten.append(
                Message(content, dst_node_id=node_id, message_type=message.metadata.message_type)
            )
        log(
            INFO,
            "%s: sent %d nodes the global model projected to their widths",
            messages[0].metadata.message_type, projected_count,
        )
        return rewritten

    def _config(self, widths: Widths) -> ModelConfig:
        if widths not in self._configs:
            self._configs[widths] = narrower_config(self.base, *widths)
        return self._configs[widths]

    def _truncated(self, global_state: StateDict, widths: Widths) -> dict[str, torch.Tensor]:
        wide, narrow = self.spec(self.global_widths), self.spec(widths)
        return project(global_state, wide, narrow, truncation_maps(narrow, wide))


__all__ = ["NodeProjections"]
