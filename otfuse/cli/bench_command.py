"""``otfuse bench``: benchmarks and experiments that write tables and plots."""

from __future__ import annotations

import argparse
import logging
import platform
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand and its benchmarks to the CLI."""
    parser = subparsers.add_parser("bench", help="run a benchmark or experiment and write its tables")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    fusion = benchmarks.add_parser(
        "fusion",
        help="time and peak memory of OT fusion against plain averaging",
        description="Measure fusion speed and memory: 8 models at the reference size with hard and soft "
        "alignment, then growth with the number of models and with width.",
    )
    fusion.add_argument("--out", type=Path, default=Path("outputs/bench-fusion"), help="folder for results.md")
    fusion.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    fusion.set_defaults(handler=run_fusion)

    from otfuse.bench.config import available_experiments, load_experiment

    for name in available_experiments():
        config = load_experiment(name)
        experiment = benchmarks.add_parser(
            name, help=config.description.split(".")[0].strip(), description=config.description
        )
        experiment.add_argument("--out", type=Path, default=Path(f"outputs/bench-{name}"),
                                help="folder for results.md, the CSV files and the plots")
        experiment.add_argument("--data-dir", help="local Parquet data folder (default: $OTFUSE_DATA_DIR, else the hub)")
        experiment.add_argument("--mode", choices=("oneshot", "federated", "all"), default="all",
                                help="run one-shot fusion, the federated simulation, or both (default: the modes in the config)")
        experiment.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the config's)")
        experiment.add_argument("--tiny", action="store_true",
                                help="a few hundred examples, 2 seeds, a small model: a smoke test that finishes in minutes")
        experiment.set_defaults(handler=run_experiment_command, experiment=name)


def run_fusion(args: argparse.Namespace) -> int:
    """Run the fusion speed benchmark and write ``results.md`` into ``args.out``."""
    from otfuse.bench.fusion_speed import default_cases, markdown_table, measure

    console = Console()
    series = default_cases(quick=args.quick)
    results = {}
    total = sum(len(cases) for cases in series.values())
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring fusion", total=total)
        for name, cases in series.items():
            results[name] = []
            for case in cases:
                results[name].append(measure(case))
                progress.advance(task)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {platform.processor() or 'unknown CPU'}, Python {platform.python_version()}"
    sections = [f"Measured {stamp} on {machine} with `otfuse bench fusion{' --quick' if args.quick else ''}`."]
    titles = {"reference": "Reference size", "models": "Growth with the number of models", "width": "Growth with width"}
    for name, measurements in results.items():
        sections.append(f"### {titles[name]}\n\n{markdown_table(measurements)}")
    text = "\n\n".join(sections) + "\n"
    (args.out / "results.md").write_text(text, encoding="utf-8")
    console.print(text)
    return 0


def run_experiment_command(args: argparse.Namespace) -> int:
    """Run a pinned experiment in the requested modes and write its report into ``args.out``."""
    from otfuse.bench.config import load_experiment
    from otfuse.bench.runner import run_experiment, tiny_overrides

    config = load_experiment(args.experiment)
    if args.tiny:
        config = config.with_overrides(**tiny_overrides(config))
    if args.seeds:
        config = config.with_overrides(seeds=tuple(args.seeds))
    modes = config.modes if args.mode == "all" else (args.mode,)
    report = run_experiment(config, args.out, data_dir=args.data_dir, modes=modes)
    Console().print(f"results: {report}")
    return 0
