"""Optimal-transport alignment and fusion of transformers, independent of Flower.

The engine follows Singh & Jaggi, "Model Fusion via Optimal Transport" (NeurIPS 2020), and
Imfeld et al., "Transformer Fusion with Optimal Transport" (ICLR 2024): every model's units
are matched to a target model's units with a transport plan per group, then the aligned
models are averaged with explicit weights.
"""

from otfuse.fusion.align import GroupDiagnostics, align_model
from otfuse.fusion.engine import FusionResult, fuse
from otfuse.fusion.errors import FusionError, FusionInputError
from otfuse.fusion.maps import TransportMap
from otfuse.fusion.options import ALIGNMENTS, COSTS, DEFAULT_REG, MASSES, FusionOptions
from otfuse.fusion.spec import (
    AlignmentSpec,
    Axis,
    GroupSpec,
    SpecBuilder,
    SpecError,
    TensorSpec,
    in_axis,
    out_axis,
)

__all__ = [
    "ALIGNMENTS",
    "COSTS",
    "DEFAULT_REG",
    "MASSES",
    "AlignmentSpec",
    "Axis",
    "FusionError",
    "FusionInputError",
    "FusionOptions",
    "FusionResult",
    "GroupDiagnostics",
    "GroupSpec",
    "SpecBuilder",
    "SpecError",
    "TensorSpec",
    "TransportMap",
    "align_model",
    "fuse",
    "in_axis",
    "out_axis",
]
