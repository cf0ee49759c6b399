"""The project's transformer models, each with its alignment spec."""

from otfuse.models.activations import activation_fn, collect_activations, config_for_state_dict
from otfuse.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from otfuse.models.config import ModelConfig
from otfuse.models.encoder import PAD_ID, TransformerClassifier, build_model
from otfuse.models.spec import alignment_spec, parameter_shapes

__all__ = [
    "PAD_ID",
    "CheckpointError",
    "ModelConfig",
    "TransformerClassifier",
    "activation_fn",
    "alignment_spec",
    "build_model",
    "collect_activations",
    "config_for_state_dict",
    "load_checkpoint",
    "parameter_shapes",
    "save_checkpoint",
]
