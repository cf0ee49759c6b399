"""Experiment configurations: pinned YAML files in ``otfuse/bench/configs``, read into dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MODES = ("oneshot", "federated")
PARENT_DATA = ("shared", "partitioned")


class ExperimentConfigError(ValueError):
    """An experiment configuration file or override is invalid."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one experiment needs; every field has a documented default in its YAML file.

    ``parent_data`` is ``"shared"`` when every parent trains on the same rows (the seeds
    experiment) and ``"partitioned"`` when parent ``k`` trains on partition ``k`` of
    ``partitioning``. ``variants`` maps a fused model's name to its fusion options.
    """

    name: str
    description: str
    datasets: tuple[str, ...]
    num_parents: int
    parent_data: str = "partitioned"
    partitioning: str = "iid"
    partition_options: Mapping[str, Any] = field(default_factory=dict)
    test_datasets: tuple[str, ...] = ()
    different_inits: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    max_train_examples: int | None = 4000
    max_test_examples: int | None = 1000
    model: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 2
    batch_size: int = 64
    lr: float = 2e-3
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    finetune_variants: tuple[str, ...] = ()
    finetune_examples: int = 1024
    centralised: bool = True
    modes: tuple[str, ...] = ("oneshot",)
    federated: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.parent_data not in PARENT_DATA:
            raise ExperimentConfigError(
                f"experiment {self.name!r}: parent_data must be one of {PARENT_DATA}, got {self.parent_data!r}"
            )
        unknown_modes = [m for m in self.modes if m not in MODES]
        if unknown_modes:
            raise ExperimentConfigError(
                f"experiment {self.name!r}: unknown mode {unknown_modes[0]!r}; choose from {MODES}"
            )
        missing = [v for v in self.finetune_variants if v not in self.variants]
        if missing:
            raise ExperimentConfigError(
                f"experiment {self.name!r}: finetune variant {missing[0]!r} is not one of the variants "
                f"{sorted(self.variants)}"
            )
        if not self.seeds:
            raise ExperimentConfigError(f"experiment {self.name!r}: list at least one seed")
        if self.num_parents < 1:
            raise ExperimentConfigError(f"experiment {self.name!r}: num_parents must be at least 1")

    @property
    def evaluation_datasets(self) -> tuple[str, ...]:
        return self.test_datasets or self.datasets

    def with_overrides(self, **overrides: Any) -> ExperimentConfig:
        """Return a copy with some fields replaced (for example fewer seeds or examples)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ExperimentConfigError(f"unknown experiment setting {unknown[0]!r}; known: {sorted(known)}")
        return dataclasses.replace(self, **_tuples(overrides))


def available_experiments() -> list[str]:
    """Return the names of the pinned experiment configurations."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def load_experiment(name_or_path: str | Path) -> ExperimentConfig:
    """Read a pinned experiment by name, or any YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ExperimentConfigError(
            f"experiment {str(name_or_path)!r} not found; choose one of {available_experiments()} "
            "or pass the path of a YAML file"
        )
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ExperimentConfigError(f"{path} must contain a mapping of settings")
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ExperimentConfigError(f"{path}: unknown setting {unknown[0]!r}; known settings: {sorted(known)}")
    try:
        return ExperimentConfig(**_tuples(values))
    except TypeError as error:
        raise ExperimentConfigError(f"{path}: {error}") from error


def _tuples(values: Mapping[str, Any]) -> dict[str, Any]:
    converted = dict(values)
    for key in ("datasets", "test_datasets", "seeds", "finetune_variants", "modes"):
        if key in converted and isinstance(converted[key], list):
            converted[key] = tuple(converted[key])
    return converted
