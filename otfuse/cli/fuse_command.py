"""``otfuse fuse``: fuse safetensors checkpoints with the OT engine, without Flower."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from otfuse.fusion import ALIGNMENTS, COSTS, DEFAULT_REG, MASSES, FusionOptions, fuse
from otfuse.models import load_checkpoint
from otfuse.task import model_of_checkpoint

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fuse`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "fuse",
        help="fuse safetensors checkpoints into one model with optimal-transport alignment",
        description=(
            "Align the checkpoints' neurons to an anchor with optimal transport and average them. "
            "Each checkpoint must carry its model config in its metadata (as `otfuse run` writes it). "
            "Checkpoints of a pretrained encoder need its folder on this machine."
        ),
    )
    parser.add_argument("checkpoints", nargs="+", type=Path, help="safetensors checkpoints to fuse")
    parser.add_argument("-o", "--output", type=Path, required=True, help="path of the fused checkpoint")
    parser.add_argument("--weights", type=float, nargs="+", help="positive weight per checkpoint (default: equal)")
    parser.add_argument("--alignment", choices=ALIGNMENTS, default="hard", help="hard (exact OT), soft (Sinkhorn) or none (plain averaging)")
    parser.add_argument("--reg", type=float, default=DEFAULT_REG, help=f"Sinkhorn regularisation on the max-normalised cost (default {DEFAULT_REG})")
    parser.add_argument("--masses", choices=MASSES, default="uniform", help="support masses of the neurons")
    parser.add_argument("--cost", choices=COSTS[:1], default="weight", help="ground cost (activation costs need data: use the Python API)")
    parser.add_argument("--anchor", type=int, default=0, help="index of the checkpoint the others are aligned to")
    parser.add_argument("--barycenter-iters", type=int, default=0, help="re-align every model to the fused one this many times")
    parser.add_argument("--no-match-heads", action="store_true", help="keep head h matched to head h instead of permuting heads")
    parser.add_argument("--diagnostics", type=Path, help="write per-group diagnostics as JSON lines to this file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the checkpoints, fuse them and write the result; return the exit code."""
    states, models = [], []
    for path in args.checkpoints:
        state, config = load_checkpoint(path)
        states.append(state)
        models.append(model_of_checkpoint(config))
    options = FusionOptions(
        alignment=args.alignment,
        reg=args.reg,
        masses=args.masses,
        cost=args.cost,
        anchor=args.anchor,
        barycenter_iters=args.barycenter_iters,
        match_heads=not args.no_match_heads,
    )
    result = fuse(states, [model.alignment_spec() for model in models], args.weights, options)
    models[options.anchor].save(
        args.output,
        result.state_dict,
        metadata={"otfuse.fused_from": json.dumps([str(p) for p in args.checkpoints])},
    )
    if args.diagnostics:
        with open(args.diagnostics, "w", encoding="utf-8") as handle:
            for record in result.diagnostics:
                handle.write(json.dumps(record.as_dict()) + "\n")
    logger.info(
        "fused %d checkpoints in %.2f s (alignment=%s) into %s",
        len(states), result.seconds, options.alignment, args.output,
    )
    return 0
