"""The table of per-round global test accuracy that ``otfuse run`` prints at the end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

OVERALL_COLUMN = "overall"


def accuracy_table(records: Sequence[dict[str, Any]], title: str) -> Table:
    """Build a table with one row per round and one accuracy column per data set.

    ``records`` are ``metrics.jsonl`` records of one run, as the ServerApp writes them.
    """
    dataset_names: list[str] = []
    for record in records:
        for name in record["datasets"]:
            if name not in dataset_names:
                dataset_names.append(name)

    table = Table(title=title)
    table.add_column("round", justify="right")
    for name in dataset_names:
        table.add_column(name, justify="right")
    table.add_column(OVERALL_COLUMN, justify="right")
    table.add_column("fusion s", justify="right")

    for record in sorted(records, key=lambda item: item["round"]):
        cells = [str(record["round"])]
        for name in dataset_names:
            scores = record["datasets"].get(name)
            cells.append(_format_accuracy(scores))
        cells.append(_format_accuracy(record.get(OVERALL_COLUMN)))
        seconds = record.get("fusion_seconds")
        cells.append("-" if seconds is None else f"{seconds:.2f}")
        table.add_row(*cells)
    return table


def _format_accuracy(scores: dict[str, Any] | None) -> str:
    if not scores or scores.get("accuracy") is None:
        return "-"
    return f"{scores['accuracy']:.3f}"
