"""``otfuse run``: the federated simulation through ``flwr run``, offline and self-contained.

The command checks the settings and the data before anything starts. It then starts its own
local SuperLink with the offline environment and runs ``flwr run <app> --stream``. Because
``flwr run`` exits 0 even when the run failed, it checks the run status and the metrics file
itself. Last, it stops the SuperLink and prints the per-round accuracy table from
``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from otfuse.cli.errors import CommandError
from otfuse.cli.flower_env import RAY_LOCAL_NODE_SWITCH, offline_env
from otfuse.cli.report import accuracy_table
from otfuse.cli.resume import ResumePoint, find_resume_point, write_federation
from otfuse.cli.processes import find_executable, free_port
from otfuse.cli.ray_cluster import (
    RAY_ADDRESS_ENV,
    check_ray_head,
    is_loopback_address,
    resolve_ray_address,
)
from otfuse.cli.superlink import LocalSuperLink

#: Name of the SuperLink connection in the per-run Flower config file.
CONNECTION = "otfuse-local"
#: Nodes of an "iid" run when --num-clients is not given.
DEFAULT_IID_CLIENTS = 3
COMPLETED = "finished:completed"
FLOWER_LOG_FILE = "flower.log"
SUPERLINK_LOG_FILE = "superlink.log"
STATE_DIR_NAME = ".otfuse"

#: The line of ``flwr run`` output that carries the new run's id.
RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the federated simulation (a wrapper of flwr run)",
        description=(
            "Run the Flower simulation offline: one client per partition trains the model, the "
            "server fuses the client models each round and scores the global model on every "
            "data set's test split. Settings not given here come from [tool.flwr.app.config] "
            "in pyproject.toml."
        ),
    )
    parser.add_argument("--strategy", help="server strategy: otfusion or fedavg")
    parser.add_argument(
        "--data-dir",
        help="folder of the Parquet data sets (default: the OTFUSE_DATA_DIR environment variable)",
    )
    parser.add_argument("--rounds", type=int, help="federated rounds (run-config key num-server-rounds)")
    parser.add_argument(
        "--num-clients",
        type=int,
        help=(
            "simulated nodes (default: one per data set for per-dataset partitioning, "
            f"{DEFAULT_IID_CLIENTS} for iid)"
        ),
    )
    parser.add_argument(
        "--output-dir", help="folder for the model and metrics (default: outputs/<timestamp>-<strategy>)"
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar='"KEY=VALUE ..."',
        help=(
            "more run-config settings, as for flwr run, e.g. "
            '"local-epochs=2 fusion.alignment=\'soft\'"'
        ),
    )
    parser.add_argument(
        "--client-cpus", type=int, default=1, help="CPU cores Ray reserves per client (default: 1)"
    )
    parser.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help=(
            "attach the simulation to the running Ray cluster whose head listens at HOST:PORT "
            f"(default: the {RAY_ADDRESS_ENV} environment variable; without either, the "
            "simulation starts a Ray instance of its own)"
        ),
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help=(
            "continue the interrupted run whose output folder is DIR after its last complete "
            "round, with the settings saved in its checkpoint; only --rounds and the run-config "
            "keys num-server-rounds, round-timeout, min-available-nodes, data-dir and "
            "checkpoint-keep may change"
        ),
    )
    parser.add_argument(
        "--app", help="folder of the Flower app, with pyproject.toml (default: the otfuse checkout)"
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not echo the Flower log, which is still written to flower.log",
    )
    parser.set_defaults(handler=run_command)


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, checked before any process starts."""

    app_dir: Path
    values: dict[str, Any]
    num_rounds: int
    num_clients: int
    client_cpus: int
    data_dir: Path
    output_dir: Path
    quiet: bool
    #: Head address of an existing Ray cluster, or None for a Ray instance per run.
    ray_address: str | None = None
    #: The last complete round of the run that this one resumes, or None for a new run.
    resumed_round: int | None = None


def run_command(args: argparse.Namespace) -> int:
    """Check the settings and data, run the simulation, and print the accuracy table."""
    from otfuse.data_partitions import DataError
    from otfuse.runconfig import RunConfigError

    console = Console(highlight=False)
    try:
        plan = plan_run(args)
    except (RunConfigError, DataError) as error:
        raise CommandError(str(error)) from None
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        records = execute(plan, console)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    console.print(accuracy_table(records, title=f"Global test accuracy ({plan.values['strategy']})"))
    console.print(f"Model and metrics: {plan.output_dir}")
    return 0


def _raise_on_sigterm(signal_number: int, _frame: object) -> None:
    # Raising here unwinds through execute(), whose cleanup stops the SuperLink; without a
    # handler SIGTERM would end this process at once and leave the SuperLink running.
    raise CommandError("terminated by SIGTERM", exit_code=128 + signal_number)


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Merge pyproject defaults, --run-config and the options; validate settings and data."""
    from otfuse import runconfig
    from otfuse.data_partitions import DATA_DIR_ENV, resolve_data_dir

    app_dir = find_app_dir(args.app)
    # Callers that build the namespace themselves (otfuse bench) may leave the option out.
    resume = _resume_point(args)
    values = read_app_config(app_dir) if resume is None else dict(resume.values)
    values.update(parse_run_config_args(args.run_config))
    if args.strategy is not None:
        values[runconfig.STRATEGY.key] = args.strategy
    if args.rounds is not None:
        values[runconfig.NUM_SERVER_ROUNDS.key] = args.rounds

    if resume is not None:
        values[runconfig.RESUME_FROM.key] = str(resume.output_dir)
        values[runconfig.OUTPUT_DIR.key] = str(resume.output_dir)
    data_dir_text = args.data_dir or values.get(runconfig.DATA_DIR.key) or os.environ.get(DATA_DIR_ENV)
    if not data_dir_text:
        raise CommandError(
            f"no data folder: pass --data-dir PATH or set {DATA_DIR_ENV}; otfuse run works "
            "offline and does not download data sets"
        )
    data_dir = resolve_data_dir(Path(data_dir_text).expanduser().resolve())
    values[runconfig.DATA_DIR.key] = str(data_dir)
    config = runconfig.load_run_config(values)
    if resume is not None:
        runconfig.check_resume_compatible(resume.values, config)

    if args.num_clients is not None:
        num_clients = args.num_clients
    elif resume is not None and resume.num_clients is not None:
        num_clients = resume.num_clients
    elif config.get(runconfig.PARTITIONING) == "per-dataset":
        num_clients = len(config.datasets)
    else:
        num_clients = DEFAULT_IID_CLIENTS
    _check_node_counts(config, num_clients)
    if args.client_cpus < 1:
        raise CommandError(f"--client-cpus must be at least 1, got {args.client_cpus}")
    if resume is not None and resume.num_clients not in (None, num_clients):
        raise CommandError(
            f"--num-clients {num_clients} differs from the {resume.num_clients} nodes of the run "
            "being resumed, which would give the nodes other partitions; leave it out"
        )
    preflight_data(config, num_clients)
    # Callers that build the namespace themselves (otfuse bench) may leave the option out.
    ray_address = resolve_ray_address(getattr(args, "ray_address", None), os.environ)
    if ray_address is not None:
        check_ray_head(ray_address)

    strategy = config.get(runconfig.STRATEGY)
    if resume is None:
        output_dir = _output_dir(args.output_dir or config.get(runconfig.OUTPUT_DIR), strategy)
    else:
        output_dir = resume.output_dir
    values = config.to_flower()
    values[runconfig.OUTPUT_DIR.key] = str(output_dir)
    return RunPlan(
        app_dir=app_dir,
        values=values,
        num_rounds=config.get(runconfig.NUM_SERVER_ROUNDS),
        num_clients=num_clients,
        client_cpus=args.client_cpus,
        data_dir=data_dir,
        output_dir=output_dir,
        quiet=args.quiet,
        ray_address=ray_address,
        resumed_round=None if resume is None else resume.server_round,
    )


def _resume_point(args: argparse.Namespace) -> ResumePoint | None:
    location = getattr(args, "resume", None)
    if location is None:
        return None
    if args.output_dir is not None:
        raise CommandError(
            "--output-dir cannot be combined with --resume, because a resumed run continues "
            "in the output folder it resumes"
        )
    return find_resume_point(location)


def find_app_dir(app: str | None) -> Path:
    """Return the Flower app folder: ``app``, else the checkout this package lives in, else cwd."""
    if app is not None:
        candidates = [Path(app).expanduser().resolve()]
    else:
        candidates = [Path(__file__).resolve().parents[2], Path.cwd()]
    for candidate in candidates:
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(encoding="utf-8"):
            return candidate
    raise CommandError(
        f"no Flower app found in {', '.join(str(c) for c in candidates)}: the folder needs a "
        "pyproject.toml with [tool.flwr.app]; run from the otfuse checkout or pass --app PATH"
    )


def read_app_config(app_dir: Path) -> dict[str, Any]:
    """Return ``[tool.flwr.app.config]`` of the app's pyproject.toml as a flat dict."""
    from flwr.common.config import flatten_dict

    with open(app_dir / "pyproject.toml", "rb") as handle:
        pyproject = tomllib.load(handle)
    return dict(flatten_dict(pyproject.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})))


def parse_run_config_args(lines: list[str]) -> dict[str, Any]:
    """Parse ``--run-config`` strings the way ``flwr run`` does, into one flat dict."""
    import click
    from flwr.common.config import parse_config_args

    values: dict[str, Any] = {}
    for line in lines:
        if line.strip() and "=" not in line:
            raise CommandError(f"invalid --run-config {line!r}: expected KEY=VALUE pairs")
        try:
            # One line at a time: flwr merges several lines' nested tables shallowly.
            values.update(parse_config_args([line]))
        except (click.ClickException, ValueError, OSError) as error:
            message = error.format_message() if isinstance(error, click.ClickException) else str(error)
            raise CommandError(f"invalid --run-config {line!r}: {message}") from None
    return values


def _check_node_counts(config: Any, num_clients: int) -> None:
    """Reject minimum node counts above the number of nodes; Flower would wait forever."""
    from otfuse import runconfig

    if num_clients < 1:
        raise CommandError(f"--num-clients must be at least 1, got {num_clients}")
    minimums = [runconfig.MIN_AVAILABLE_NODES, runconfig.MIN_TRAIN_NODES]
    if config.get(runconfig.FRACTION_EVALUATE) > 0:
        minimums.append(runconfig.MIN_EVALUATE_NODES)
    for setting in minimums:
        if config.get(setting) > num_clients:
            raise CommandError(
                f"run-config key {setting.key!r} is {config.get(setting)} but the simulation has "
                f"{num_clients} nodes, so the server would wait forever; lower it or raise --num-clients"
            )
    replies = config.get(runconfig.MIN_TRAIN_REPLIES)
    if replies > num_clients:
        raise CommandError(
            f"run-config key {runconfig.MIN_TRAIN_REPLIES.key!r} is {replies} but the simulation has "
            f"{num_clients} nodes, so every round would be skipped; lower it or raise --num-clients"
        )


def preflight_data(config: Any, num_clients: int) -> None:
    """Load every split the run will read once, so data errors surface before Flower starts.

    Raises :class:`~otfuse.data_partitions.DataError` for a missing file or column, or a
    partition count that does not fit the partitioning.
    """
    from otfuse import runconfig
    from otfuse.data_partitions import load_client_data, load_global_test

    data_dir = config.get(runconfig.DATA_DIR)
    load_global_test(config.datasets, data_dir, max_examples_per_dataset=1)
    partitioning = config.get(runconfig.PARTITIONING)
    # Per-dataset nodes read different files; iid nodes all read the same one.
    partition_ids = range(num_clients) if partitioning == "per-dataset" else [0]
    for partition_id in partition_ids:
        load_client_data(
            partitioning,
            partition_id,
            num_clients,
            datasets=config.datasets,
            data_dir=data_dir,
            seed=config.get(runconfig.SEED),
            max_train_examples=1,
            local_test_fraction=0.0,
            iid_dataset=config.iid_dataset,
            alpha=config.get(runconfig.DIRICHLET_ALPHA),
            size_skew=config.get(runconfig.SIZE_SKEW),
        )


def _output_dir(value: str | None, strategy: str) -> Path:
    if value:
        output_dir = Path(value).expanduser().resolve()
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        output_dir = Path.cwd() / "outputs" / f"{stamp}-{strategy}"
    if (output_dir / "metrics.jsonl").exists():
        raise CommandError(
            f"{output_dir} already contains metrics.jsonl from an earlier run; choose another --output-dir"
        )
    return output_dir


def execute(plan: RunPlan, console: Console) -> list[dict[str, Any]]:
    """Start a SuperLink, run the app, check the result and stop the SuperLink.

    Returns the run's ``metrics.jsonl`` records.
    """
    from otfuse.data_partitions import DATA_DIR_ENV

    state_dir = plan.app_dir / STATE_DIR_NAME
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    write_federation(plan.output_dir, plan.num_clients, plan.client_cpus)
    superlink_port, control_port = free_port(), free_port()
    env = offline_env(state_dir, superlink_port=superlink_port, control_port=control_port)
    env[DATA_DIR_ENV] = str(plan.data_dir)
    # The simulation inherits the SuperLink's environment, and its ray.init() connects to
    # RAY_ADDRESS when that is set; see otfuse.cli.ray_cluster.
    env.pop(RAY_ADDRESS_ENV, None)
    if plan.ray_address is not None:
        env[RAY_ADDRESS_ENV] = plan.ray_address
        # A head on loopback needs a driver on loopback too, because otherwise Ray finds no
        # raylet at the driver's address and the run hangs. Remote heads need the real address.
        if not is_loopback_address(plan.ray_address):
            env.pop(RAY_LOCAL_NODE_SWITCH, None)
    # A Flower home per run keeps parallel runs from sharing a config file or app folder.
    flwr_home = Path(tempfile.mkdtemp(prefix="flwr-home-", dir=state_dir))
    env["FLWR_HOME"] = str(flwr_home)
    superlink = LocalSuperLink(
        env=env,
        port=superlink_port,
        control_port=control_port,
        log_path=plan.output_dir / SUPERLINK_LOG_FILE,
        cwd=Path.cwd(),
    )
    try:
        _write_connection(flwr_home, superlink.address)
        run_config_file = _write_run_config(flwr_home, plan.values)
        console.print(f"Starting a local SuperLink on {superlink.address}")
        if plan.ray_address is not None:
            console.print(f"The simulation attaches to the Ray cluster at {plan.ray_address}")
        with superlink:
            run_id = _stream_run(plan, env, run_config_file, console)
            status, details = run_status(env, run_id)
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)

    log_hint = f"see {plan.output_dir / FLOWER_LOG_FILE} and {plan.output_dir / SUPERLINK_LOG_FILE}"
    if status != COMPLETED:
        raise CommandError(
            f"run {run_id} ended with status {status!r} ({details or 'no details'}); {log_hint}"
        )
    return _completed_records(plan, run_id, log_hint)


def _write_connection(flwr_home: Path, address: str) -> None:
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n',
        encoding="utf-8",
    )


def _write_run_config(flwr_home: Path, values: dict[str, Any]) -> Path:
    # A TOML file, not "k=v" strings, so that paths with spaces or quotes arrive intact.
    import tomli_w

    nested: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        table = nested
        for parent in parents:
            table = table.setdefault(parent, {})
        table[leaf] = value
    path = flwr_home / "run-config.toml"
    path.write_text(tomli_w.dumps(nested), encoding="utf-8")
    return path


def _stream_run(plan: RunPlan, env: dict[str, str], run_config_file: Path, console: Console) -> int:
    command = [
        find_executable("flwr"), "run", str(plan.app_dir), CONNECTION, "--stream",
        "--run-config", str(run_config_file),
        "--federation-config",
        f"num-supernodes={plan.num_clients} client-resources-num-cpus={plan.client_cpus}",
    ]
    run_id = None
    log_path = plan.output_dir / FLOWER_LOG_FILE
    with open(log_path, "a", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            command, env=env, cwd=plan.app_dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        try:
            for line in process.stdout or ():
                log_file.write(line)
                if not plan.quiet:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                match = RUN_ID_PATTERN.search(line)
                if match and run_id is None:
                    run_id = int(match.group(1))
            return_code = process.wait()
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait()
    if run_id is None:
        raise CommandError(
            f"flwr run exited with code {return_code} without starting a run; see {log_path}"
        )
    return run_id


def run_status(env: dict[str, str], run_id: int, connection: str = CONNECTION) -> tuple[str, str]:
    """Return the status of a run (``finished:completed`` on success) and its details, from ``flwr ls``."""
    command = [find_executable("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    try:
        runs = json.loads(completed.stdout)["runs"]
        return runs[0]["status"], runs[0].get("status-details", "")
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        output = (completed.stdout + completed.stderr).strip().splitlines()
        raise CommandError(
            f"could not read the status of run {run_id} from flwr ls (exit code "
            f"{completed.returncode}): {output[-1] if output else 'no output'}"
        ) from None


def _completed_records(plan: RunPlan, run_id: int, log_hint: str) -> list[dict[str, Any]]:
    from otfuse.server.outputs import METRICS_FILE, MODEL_FILE, read_metrics

    metrics_path = plan.output_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise CommandError(f"run {run_id} completed but wrote no {metrics_path}; {log_hint}")
    records = read_metrics(metrics_path)
    if plan.resumed_round is None:
        records = [record for record in records if record.get("run_id") == run_id]
    else:
        # The rounds up to the checkpoint come from the interrupted run, under its run id.
        records = [
            record for record in records
            if record.get("run_id") == run_id or record["round"] <= plan.resumed_round
        ]
    missing = sorted(set(range(plan.num_rounds + 1)) - {record["round"] for record in records})
    if missing:
        raise CommandError(
            f"run {run_id} completed but {metrics_path} lacks rounds {missing}; {log_hint}"
        )
    if not (plan.output_dir / MODEL_FILE).is_file():
        raise CommandError(
            f"run {run_id} completed but wrote no {plan.output_dir / MODEL_FILE}; {log_hint}"
        )
    return records
