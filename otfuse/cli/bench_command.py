"""``otfuse bench``: benchmarks and experiments that write tables and plots."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
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

    strategies = benchmarks.add_parser(
        "strategies",
        help="OT fusion against Flower's strategies on every partitioning, with several seeds",
        description="Run the Flower simulation for every strategy on every partitioning (iid, "
        "dirichlet-0.1, dirichlet-1.0, per-dataset, per-language) with several seeds, and write "
        "leaderboards, a CSV of every round and plots. Finished runs in --out are read instead of "
        "run again, so an interrupted benchmark continues where it stopped.",
    )
    strategies.add_argument("--out", type=Path, default=Path("outputs/bench-strategies"),
                            help="folder for results.md, the CSV files, the plots and every run")
    strategies.add_argument("--quick", action="store_true",
                            help="3 strategies x 2 partitionings x 1 seed x 3 rounds at a smaller size")
    strategies.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: 0 1 2, or 0 with --quick)")
    strategies.add_argument("--strategies", nargs="+", metavar="NAME",
                            help="strategies to run (default: all ten, or three with --quick)")
    strategies.add_argument("--partitionings", nargs="+", metavar="NAME",
                            help="partition cases to run (default: all five, or two with --quick)")
    strategies.add_argument("--rounds", type=int, help="federated rounds per run (default: 8, or 3 with --quick)")
    strategies.add_argument("--data-dir", help="local Parquet data folder (default: $OTFUSE_DATA_DIR)")
    strategies.add_argument("--ray-address", metavar="HOST:PORT",
                            help="run every simulation on this running Ray cluster instead of a Ray instance per run")
    strategies.add_argument("--jobs", type=int, default=1,
                            help="simulations to run at once, each in its own process (default: 1); "
                            "2 or 3 finish sooner on two cores but make the timings noisier")
    strategies.add_argument("--note", default="", help="a sentence for the report header, such as the machine's load")
    strategies.set_defaults(handler=run_strategies)

    overhead = benchmarks.add_parser(
        "overhead",
        help="wall time per round of OTFusion against FedAvg, split into training, fusion and Flower + Ray",
        description="Run FedAvg and OTFusion (hard alignment) on identical clients from scratch and "
        "split their wall time per round into client training, server aggregation, server evaluation "
        "and the rest, which is the simulation's own overhead.",
    )
    overhead.add_argument("--out", type=Path, default=Path("outputs/bench-overhead"), help="folder for the two runs")
    overhead.add_argument("--rounds", type=int, default=6, help="federated rounds per run (default: 6)")
    overhead.add_argument("--clients", type=int, default=4, help="simulated clients (default: 4)")
    overhead.add_argument("--data-dir", help="local Parquet data folder (default: $OTFUSE_DATA_DIR)")
    overhead.add_argument("--ray-address", metavar="HOST:PORT", help="run on this running Ray cluster")
    overhead.set_defaults(handler=run_overhead)

    translation = benchmarks.add_parser(
        "translation",
        help="fuse encoder-decoder translation models (Tatoeba Finnish to English), scored with BLEU and chrF",
        description="Parents trained on IID and sentence-length shards of Tatoeba, fused with plain averaging "
        "and OT (hard, soft, whole model or decoder only), with and without fine-tuning.",
    )
    translation.add_argument("--out", type=Path, default=Path("outputs/bench-translation"), help="output folder")
    translation.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one full run each")
    translation.add_argument("--size", choices=("default", "tiny"), default="default", help="experiment size")
    translation.add_argument("--data-dir", type=Path, help="local Parquet data folder (default: $OTFUSE_DATA_DIR)")
    translation.set_defaults(handler=run_translation)

    widths = benchmarks.add_parser(
        "widths",
        help="OTFusion with mixed wide and narrow clients against all-wide and all-narrow runs",
        description="Run OTFusion on IID SST-2 shards with every client at the global width, with "
        "every second client at half the width (client-width-factors), and with a global model "
        "and clients of half the width, over 3 seeds; write results.md, a CSV and a plot. "
        "Finished runs in --out are read instead of run again.",
    )
    widths.add_argument("--out", type=Path, default=Path("outputs/bench-widths"),
                        help="folder for results.md, the CSV, the plot and every run")
    widths.add_argument("--tiny", action="store_true",
                        help="2 clients, 2 rounds, 1 seed and a tiny model: a smoke test")
    widths.add_argument("--data-dir", help="local Parquet data folder (default: $OTFUSE_DATA_DIR)")
    widths.set_defaults(handler=run_widths)

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


def run_strategies(args: argparse.Namespace) -> int:
    """Run the strategy matrix and write its report into ``args.out``."""
    from otfuse.bench.strategies import (
        accuracy_overview,
        build_matrix,
        run_matrix,
        run_summaries,
        summarise_runs,
        write_outputs,
    )
    from otfuse.cli.errors import CommandError

    if args.jobs < 1:
        raise CommandError(f"--jobs {args.jobs} is invalid; give 1 or more parallel runs")
    try:
        matrix = build_matrix(quick=args.quick, seeds=args.seeds, strategies=args.strategies,
                              cases=args.partitionings, rounds=args.rounds)
    except ValueError as error:
        raise CommandError(str(error)) from None
    console = Console()
    console.print(f"{matrix.num_runs} runs; finished ones in {args.out} are read, not run again")
    # As in otfuse run: raising on SIGTERM unwinds through the running simulation's cleanup,
    # which stops its SuperLink; without a handler the SuperLink would keep running.
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        result = run_matrix(matrix, args.out, data_dir=args.data_dir, ray_address=args.ray_address,
                            jobs=args.jobs)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    try:
        report = write_outputs(matrix, result, args.out, note=args.note)
    except ValueError as error:
        raise CommandError(str(error)) from None
    summary = summarise_runs(run_summaries(result.rounds, matrix.cases))
    console.print(accuracy_overview(summary, matrix.cases), markup=False)
    console.print(f"results: {report}")
    if result.failures:
        console.print(f"{len(result.failures)} runs failed; run the command again to retry them", markup=False)
        return 1
    return 0


def _raise_on_sigterm(signal_number: int, _frame: object) -> None:
    from otfuse.cli.errors import CommandError

    raise CommandError("terminated by SIGTERM", exit_code=128 + signal_number)


def run_overhead(args: argparse.Namespace) -> int:
    """Time FedAvg and OTFusion runs and print the per-round breakdown as Markdown."""
    from otfuse.bench.overhead import markdown, measure

    results = measure(args.out, args.data_dir, rounds=args.rounds, num_clients=args.clients,
                      ray_address=args.ray_address)
    Console().print(markdown(results), markup=False)
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


def run_widths(args: argparse.Namespace) -> int:
    """Run the client-widths experiment and print where its report is."""
    import shlex
    import sys

    from otfuse.bench.widths import DEFAULT_SIZE, TINY_SIZE
    from otfuse.bench.widths import run_widths as run_widths_experiment

    command = "otfuse " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{stamp}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    # As in otfuse bench strategies: raising on SIGTERM stops the running simulation's SuperLink.
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        report = run_widths_experiment(args.out, TINY_SIZE if args.tiny else DEFAULT_SIZE,
                                       data_dir=args.data_dir, command=command, machine=machine)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    Console().print(f"results: {report}")
    return 0


def run_translation(args: argparse.Namespace) -> int:
    """Run the translation experiment and print where its results are."""
    import shlex
    import sys

    from otfuse.bench.translation import run_translation_experiment

    command = "otfuse " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    results = run_translation_experiment(args.out, seeds=args.seeds, size=args.size,
                                         data_dir=args.data_dir, command=command)
    Console().print(f"results: {', '.join(str(path) for path in results.files.values())}")
    return 0
