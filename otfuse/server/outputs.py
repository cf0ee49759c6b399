"""The run's output folder: the final model and one metrics record per round."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"


def resolve_output_dir(value: str, strategy: str, now: datetime | None = None) -> Path:
    """Return ``value`` as an absolute folder; empty means ``outputs/<timestamp>-<strategy>``.

    Relative paths are resolved against the working folder of this process, which for a
    ServerApp is the folder the SuperLink was started in.
    """
    if not value:
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        value = os.path.join("outputs", f"{stamp}-{strategy}")
    return Path(value).expanduser().resolve()


class MetricsWriter:
    """Append one JSON object per line to ``metrics.jsonl``.

    Each record is written with one ``write`` call on a file opened for appending, then
    flushed and synced to disk, so a reader never sees half a line from a crash between rounds.
    """

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / METRICS_FILE

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(json_safe(record), allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def rewrite(self, records: list[Mapping[str, Any]]) -> None:
        """Replace the file with ``records``, through a synced temporary file and a rename."""
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


def json_safe(value: Any) -> Any:
    """Return ``value`` with NaN and infinite floats as None, because JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read every record of a ``metrics.jsonl`` file, in file order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_json(path: Path, values: Mapping[str, Any]) -> None:
    """Write ``values`` as indented JSON through a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)
