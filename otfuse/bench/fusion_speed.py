"""Speed and memory of the fusion engine: time, peak memory and where the time goes.

Every measurement runs in a fresh spawned process, so that its peak resident memory is its
own. Models are freshly initialised with different seeds, like parents trained from
different random initialisations.
"""

from __future__ import annotations

import cProfile
import dataclasses
import multiprocessing
import pstats
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from otfuse.fusion import FusionOptions, fuse
from otfuse.models import ModelConfig, alignment_spec, build_model

# Functions whose cumulative time the profile reports, by the label used in the table.
PROFILE_PARTS = {
    "descriptors": "_descriptors",
    "ground cost": "ground_cost",
    "OT solves": "solve",
    "apply maps": "apply_maps",
    "weighted sum": "_weighted_sum",
}


@dataclass(frozen=True)
class FusionCase:
    """One measured configuration: number of models, model shape and alignment."""

    num_models: int
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    alignment: str
    vocab_size: int = 16384

    def config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, d_ff=self.d_ff,
            n_layers=self.n_layers, n_heads=self.n_heads,
        )


@dataclass(frozen=True)
class FusionMeasurement:
    case: FusionCase
    seconds: float
    averaging_seconds: float
    peak_rss_mb: float
    added_rss_mb: float
    parts: dict[str, float]

    @property
    def ratio_to_averaging(self) -> float:
        return self.seconds / max(self.averaging_seconds, 1e-9)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure_in_process(case: FusionCase) -> FusionMeasurement:
    torch.set_num_threads(torch.get_num_threads())
    config = case.config()
    spec = alignment_spec(config)
    models = [build_model(config, seed=seed).state_dict() for seed in range(case.num_models)]
    fuse(models[:1], spec, options=FusionOptions(alignment="none"))  # warm imports and caches
    import ot  # noqa: F401  (POT's import time is not part of a fusion)

    started = time.perf_counter()
    fuse(models, spec, options=FusionOptions(alignment="none"))
    averaging_seconds = time.perf_counter() - started

    before = _rss_mb()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    fuse(models, spec, options=FusionOptions(alignment=case.alignment))
    profiler.disable()
    seconds = time.perf_counter() - started
    peak = _rss_mb()
    return FusionMeasurement(case, seconds, averaging_seconds, peak, peak - before, _profile_parts(profiler))


def _profile_parts(profiler: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profiler)
    parts = {}
    for label, function in PROFILE_PARTS.items():
        total = 0.0
        for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            if name == function and "otfuse" in filename:
                total = max(total, cumulative)
        parts[label] = total
    return parts


def measure(case: FusionCase) -> FusionMeasurement:
    """Measure one case in a fresh spawned process."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure_in_process, (case,))


def default_cases(quick: bool = False) -> dict[str, list[FusionCase]]:
    """The benchmark's three series: the reference size, growth with models, growth with width."""
    base = FusionCase(num_models=8, d_model=256, d_ff=1024, n_layers=4, n_heads=4, alignment="hard")
    if quick:
        base = dataclasses.replace(base, num_models=2, d_model=64, d_ff=256, n_layers=1, vocab_size=1024)
        return {
            "reference": [base, dataclasses.replace(base, alignment="soft")],
            "models": [dataclasses.replace(base, num_models=n) for n in (2, 3)],
            "width": [dataclasses.replace(base, d_model=w, d_ff=4 * w) for w in (32, 64)],
        }
    return {
        "reference": [base, dataclasses.replace(base, alignment="soft")],
        "models": [dataclasses.replace(base, num_models=n) for n in (2, 4, 8, 16)],
        # Two models only: exact OT on the 4,096 MLP units of the widest case dominates the run.
        "width": [dataclasses.replace(base, num_models=2, d_model=w, d_ff=4 * w) for w in (128, 256, 512, 1024)],
    }


def markdown_table(measurements: Iterable[FusionMeasurement]) -> str:
    """Render measurements as a Markdown table, with the time split by part."""
    header = (
        "| models | d_model | d_ff | blocks | heads | alignment | seconds | plain averaging s | ratio "
        "| peak RSS MB | added RSS MB | " + " | ".join(f"{p} s" for p in PROFILE_PARTS) + " |"
    )
    lines = [header, "|" + "---|" * (11 + len(PROFILE_PARTS))]
    for m in measurements:
        c = m.case
        parts = " | ".join(f"{m.parts[p]:.2f}" for p in PROFILE_PARTS)
        lines.append(
            f"| {c.num_models} | {c.d_model} | {c.d_ff} | {c.n_layers} | {c.n_heads} | {c.alignment} "
            f"| {m.seconds:.2f} | {m.averaging_seconds:.3f} | {m.ratio_to_averaging:.0f}x "
            f"| {m.peak_rss_mb:.0f} | {m.added_rss_mb:.0f} | {parts} |"
        )
    return "\n".join(lines)
