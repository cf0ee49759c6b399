"""The project's transformer models, each with its alignment spec."""

from otfuse.models.activations import collect_activations
from otfuse.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from otfuse.models.config import ModelConfig
from otfuse.models.encoder import PAD_ID, TransformerClassifier, build_model
from otfuse.models.spec import alignment_spec, parameter_shapes

__all__ = [
    "PAD_ID",
    "CheckpointError",
    "ModelConfig",
    "TransformerClassifier",
    "alignment_spec",
    "build_model",
    "collect_activations",
    "load_checkpoint",
    "parameter_shapes",
    "save_checkpoint",
]
