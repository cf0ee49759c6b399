"""``otfuse run --resume DIR``: continue an interrupted run from its last round checkpoint.

The settings of the resumed run are those saved in the checkpoint, so the command line
repeats none of them. It may change only the keys in
:data:`otfuse.runconfig.RESUMABLE_KEYS`, such as the number of rounds. The number of
simulated nodes, which decides the partitions, is read from ``federation.json``, which
``otfuse run`` writes into every output folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otfuse.cli.errors import CommandError

FEDERATION_FILE = "federation.json"


@dataclass(frozen=True)
class ResumePoint:
    """Starting point of a resumed run: the saved settings, the last round and the node count."""

    output_dir: Path
    values: dict[str, Any]
    server_round: int
    num_clients: int | None


def find_resume_point(location: str) -> ResumePoint:
    """Read the newest readable round checkpoint under ``location``, a run's output folder.

    Raises :class:`CommandError` when the folder contains no usable checkpoint.
    """
    from otfuse.models.checkpoint import CheckpointError
    from otfuse.server.checkpoints import latest_checkpoint

    output_dir = Path(location).expanduser().resolve()
    if not output_dir.is_dir():
        raise CommandError(f"--resume {location}: {output_dir} is not a folder; pass the output folder of the run")
    try:
        checkpoint = latest_checkpoint(output_dir)
    except CheckpointError as error:
        raise CommandError(f"--resume {location}: {error}") from None
    return ResumePoint(
        output_dir=output_dir,
        values=dict(checkpoint.run_config),
        server_round=checkpoint.server_round,
        num_clients=read_federation(output_dir).get("num_clients"),
    )


def write_federation(output_dir: Path, num_clients: int, client_cpus: int) -> None:
    """Record the simulated node count and CPUs of a run, so that a resumed run can reuse them."""
    path = output_dir / FEDERATION_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"num_clients": num_clients, "client_cpus": client_cpus}) + "\n")
    temporary.replace(path)


def read_federation(output_dir: Path) -> dict[str, Any]:
    """Return the values of ``federation.json``, or an empty dict if the file is missing."""
    path = output_dir / FEDERATION_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read {path} ({error}); delete it and pass --num-clients") from None
    return values if isinstance(values, dict) else {}
