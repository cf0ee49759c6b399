"""Deployment: docker-compose.yml, the certificate script, and the same topology as processes.

No Docker engine runs in CI, so the compose file is checked by parsing it. The deployment
it describes is started as real processes on 127.0.0.1 instead: a SuperLink with TLS and
SuperNode authentication, a SuperExec for ServerApps, and three SuperNodes with a
SuperExec each ("process" isolation, as in the compose file). A Ray head started by the
tests checks that a simulation can attach to an existing Ray cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from flower_helpers import tiny_run_config
from otfuse.cli import run_command
from otfuse.cli.errors import CommandError
from otfuse.cli.flower_env import OFFLINE_SWITCHES, offline_env
from otfuse.cli.processes import find_executable, free_port, is_healthy, start_logged_process, stop_process_tree
from otfuse.cli.ray_cluster import check_ray_head, is_loopback_address, split_ray_address
from otfuse.server.outputs import read_metrics

REPOSITORY = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPOSITORY / "docker-compose.yml"
COMPOSE_ENV_FILE = REPOSITORY / ".env"
DOCKERFILE = REPOSITORY / "deploy" / "Dockerfile"
GENERATE_CERTS = REPOSITORY / "deploy" / "generate-certs.sh"
REGISTER_SUPERNODES = REPOSITORY / "deploy" / "register-supernodes.sh"

NUM_SUPERNODES = 3
ROUNDS = 2
SUPERNODES = [f"supernode-{i}" for i in range(NUM_SUPERNODES)]
CLIENTAPP_SUPEREXECS = [f"superexec-clientapp-{i}" for i in range(NUM_SUPERNODES)]
COMPOSE_SERVICES = {"superlink", "register-supernodes", "superexec-serverapp", *SUPERNODES, *CLIENTAPP_SUPEREXECS}
# The folder that Flower's images use as working folder and mount point.
CONTAINER_WORKDIR = "/app"

STARTUP_TIMEOUT_SECONDS = 90.0
RUN_TIMEOUT_SECONDS = 420
POLL_SECONDS = 0.5
# Flower logs this exit code when a SuperNode cannot connect or is rejected; the process
# itself exits with status 1 (flwr.supercore.exit.flwr_exit, Flower 1.42).
SUPERNODE_CONNECTION_FAILED = "Exit Code: 305"

# The connections that the tests' Flower config file defines.
TLS_CONNECTION = "otfuse-tls"
NO_CA_CONNECTION = "otfuse-no-ca"



def small_run_config(data_dir: Path, **overrides: object) -> dict[str, object]:
    """Return settings for a tiny model on 300 SST-2 rows per node, without client-side evaluation.

    Client-side evaluation is off because in a deployment it starts one more ClientApp
    process per node and round.
    """
    values = tiny_run_config(data_dir.resolve(), **{
        "strategy": "otfusion",
        "max-train-examples": 300,
        "fraction-evaluate": 0.0,
        "min-evaluate-nodes": 0,
    })
    values.update(overrides)
    return values


# --- docker-compose.yml ----------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a Docker Compose .env file of KEY=VALUE lines and comments."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{path}: line without '=': {line!r}"
        values[key.strip()] = value.strip()
    return values


_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:\?|:-)(?P<argument>[^}]*))?\}")


def interpolate(value: object, variables: Mapping[str, str]) -> object:
    """Substitute ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` as Docker Compose does."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.group("name", "operator", "argument")
        current = variables.get(name, "")
        if current:
            return current
        if operator == ":-":
            return argument
        raise AssertionError(f"compose variable {name} is not set ({argument or 'no message'})")

    assert "$$" not in value, f"escaped dollar in {value!r}: extend interpolate() before using it"
    return _VARIABLE.sub(substitute, value)


def load_compose(overrides: Mapping[str, str] | None = None) -> dict:
    """Return docker-compose.yml with variables from .env, then ``overrides``, substituted."""
    variables = {**read_env_file(COMPOSE_ENV_FILE), **(overrides or {})}
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return interpolate(compose, variables)


def host_path(source: str) -> Path:
    """Resolve a bind-mount source the way Compose does: relative to the compose file."""
    path = Path(source)
    return path if path.is_absolute() else (COMPOSE_FILE.parent / path).resolve()


def split_volume(volume: str) -> tuple[str, str, str]:
    """Split a short-syntax volume ``SOURCE:TARGET[:MODE]``."""
    parts = volume.split(":")
    assert len(parts) in (2, 3), f"unexpected volume syntax {volume!r}"
    return parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"


def flower_version_pin() -> str:
    """Return the version specifier of flwr in pyproject.toml, e.g. ``>=1.42,<1.43``."""
    with open(REPOSITORY / "pyproject.toml", "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    for dependency in dependencies:
        requirement = Requirement(dependency)
        if requirement.name == "flwr":
            return requirement.specifier
    raise AssertionError("pyproject.toml does not list flwr")


def command_paths(arguments: list[str]) -> list[str]:
    """Return the values of command-line arguments that name files in the container."""
    paths = []
    for argument in arguments:
        value = argument.partition("=")[2] if argument.startswith("--") else argument
        if value.startswith(("certificates/", "keys/")):
            paths.append(value)
    return paths


def test_compose_services_and_images():
    compose = load_compose()
    services = compose["services"]
    version = read_env_file(COMPOSE_ENV_FILE)["FLWR_VERSION"]

    assert set(services) == COMPOSE_SERVICES
    assert version in flower_version_pin(), f"FLWR_VERSION={version} is outside pyproject's flwr pin"
    assert services["superlink"]["image"] == f"flwr/superlink:{version}"
    for name in SUPERNODES:
        assert services[name]["image"] == f"flwr/supernode:{version}"
    app_services = ["register-supernodes", "superexec-serverapp", *CLIENTAPP_SUPEREXECS]
    for name in app_services:
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert services[name]["build"]["args"]["FLWR_VERSION"] == version


def test_dockerfile_builds_on_superexec_image():
    text = DOCKERFILE.read_text(encoding="utf-8")
    version = read_env_file(COMPOSE_ENV_FILE)["FLWR_VERSION"]

    assert f"ARG FLWR_VERSION={version}" in text
    assert "FROM flwr/superexec:${FLWR_VERSION}" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text


def test_compose_secures_every_connection():
    services = load_compose()["services"]

    superlink = services["superlink"]["command"]
    assert "--enable-supernode-auth" in superlink
    assert "--isolation=process" in superlink
    assert "--disable-runtime-dependency-installation" in superlink
    assert "--insecure" not in superlink
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--superexec-auth-secret-file"):
        assert any(argument.startswith(f"{flag}=") for argument in superlink), flag
    for i, name in enumerate(SUPERNODES):
        command = services[name]["command"]
        assert f"--auth-supernode-private-key=keys/{name}" in command
        assert "--root-certificates=certificates/ca.crt" in command
        assert f"--node-config=partition-id={i} num-partitions={NUM_SUPERNODES}" in command
        assert "--isolation=process" in command
        assert "--insecure" not in command
    assert "--root-certificates=certificates/ca.crt" in services["superexec-serverapp"]["command"]
    registered = [argument for argument in services["register-supernodes"]["command"] if argument.endswith(".pub")]
    assert registered == [f"keys/{name}.pub" for name in SUPERNODES]


def test_compose_mounts_exist_after_cert_script(tmp_path):
    certs_dir = tmp_path / "certificates"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    generate_certs(certs_dir)
    services = load_compose(
        {"OTFUSE_CERTS_DIR": str(certs_dir), "OTFUSE_DATA_DIR": str(data_dir), "OTFUSE_OUTPUT_DIR": str(tmp_path / "out")}
    )["services"]

    for name, service in services.items():
        targets = set()
        for volume in service.get("volumes", []):
            source, target, mode = split_volume(volume)
            targets.add(target)
            if target.startswith(f"{CONTAINER_WORKDIR}/certificates/") or target.startswith(f"{CONTAINER_WORKDIR}/keys/"):
                assert host_path(source).is_file(), f"{name}: {source} does not exist"
                assert mode == "ro", f"{name}: {target} is mounted writable"
            if target == f"{CONTAINER_WORKDIR}/data":
                assert mode == "ro", f"{name}: the data folder is mounted writable"
        for path in command_paths(service.get("command", [])):
            assert f"{CONTAINER_WORKDIR}/{path}" in targets, f"{name} reads {path}, which is not mounted"


def test_compose_ports_come_from_env():
    services = load_compose({"SUPERLINK_PORT": "18000", "SUPERNODE_RUNTIME_PORT": "19094"})["services"]

    assert services["superlink"]["ports"] == ["127.0.0.1:18000:18000"]
    assert "--port=18000" in services["superlink"]["command"]
    assert "--port=19094" in services["supernode-0"]["command"]
    assert "--runtime-api-address=supernode-0:19094" in services["superexec-clientapp-0"]["command"]


# --- deploy/generate-certs.sh ----------------------------------------------------------


def generate_certs(certs_dir: Path, *options: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        ["bash", str(GENERATE_CERTS), *options, str(certs_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed


def openssl(*arguments: str) -> str:
    completed = subprocess.run(["openssl", *arguments], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_cert_script_is_idempotent(tmp_path):
    generate_certs(tmp_path)
    contents = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    second = generate_certs(tmp_path)

    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == contents
    assert "created" not in second.stdout
    assert "issued" not in second.stdout


def test_cert_script_creates_valid_files(tmp_path):
    generate_certs(tmp_path)

    assert "OK" in openssl("verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "superlink.pem"))
    names = openssl("x509", "-in", str(tmp_path / "superlink.pem"), "-noout", "-ext", "subjectAltName")
    for name in ("DNS:superlink", "DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1"):
        assert name in names
    for name in SUPERNODES:
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"
        assert (tmp_path / f"{name}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (tmp_path / "superlink.key").stat().st_mode & 0o077 == 0
    assert not (tmp_path / "superexec-superlink.secret").read_bytes().endswith(b"\n")


def test_cert_script_reissues_on_new_san(tmp_path):
    generate_certs(tmp_path)
    ca_before = (tmp_path / "ca.crt").read_bytes()

    generate_certs(tmp_path, "--san", "DNS:link.example.org")

    names = openssl("x509", "-in", str(tmp_path / "superlink.pem"), "-noout", "-ext", "subjectAltName")
    assert "DNS:link.example.org" in names
    assert (tmp_path / "ca.crt").read_bytes() == ca_before


def test_cert_script_rejects_bad_san(tmp_path):
    completed = subprocess.run(
        ["bash", str(GENERATE_CERTS), "--san", "link.example.org", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert completed.returncode == 2
    assert "invalid --san" in completed.stderr
    assert list(tmp_path.iterdir()) == []


# --- the deployment as processes -------------------------------------------------------


class Deployment:
    """SuperLink, SuperNodes and SuperExecs started as processes on 127.0.0.1, stopped by id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs_dir = root / "certificates"
        self.logs_dir = root / "logs"
        self.env = offline_env(root / "state")
        self.superlink_port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def superlink_address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def cert(self, name: str) -> str:
        return str(self.certs_dir / name)

    def write_flower_config(self) -> None:
        """Write the Flower config file with one connection that trusts the CA and one that does not."""
        (Path(self.env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "{TLS_CONNECTION}"\n\n'
            f'[superlink.{TLS_CONNECTION}]\naddress = "{self.superlink_address}"\n'
            f'root-certificates = "{self.cert("ca.crt")}"\n\n'
            f'[superlink.{NO_CA_CONNECTION}]\naddress = "{self.superlink_address}"\n',
            encoding="utf-8",
        )

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        process = start_logged_process(command, env=self.env, cwd=self.root, log_path=self.log_path(name))
        self.processes[name] = process
        return process

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(encoding="utf-8", errors="replace")

    def logs_tail(self, characters: int = 3000) -> str:
        """Return the end of every log, for assertion messages."""
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-characters:]}" for path in sorted(self.logs_dir.glob("*.log")))

    def stop_all(self) -> None:
        for process in reversed(list(self.processes.values())):
            stop_process_tree(process)

    def start_superlink(self) -> None:
        self.start("superlink", [
            find_executable("flower-superlink"),
            "--ssl-ca-certfile", self.cert("ca.crt"),
            "--ssl-certfile", self.cert("superlink.pem"),
            "--ssl-keyfile", self.cert("superlink.key"),
            "--enable-supernode-auth",
            "--isolation", "process",
            "--superexec-auth-secret-file", self.cert("superexec-superlink.secret"),
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.superlink_port),
        ])
        context = ssl.create_default_context(cafile=self.cert("ca.crt"))
        self.wait_for(
            lambda: is_healthy(f"https://{self.superlink_address}/health", ssl_context=context),
            "the SuperLink to answer /health", "superlink",
        )
        self.start("superexec-serverapp", [
            find_executable("flower-superexec"),
            "--runtime-api-address", self.superlink_address,
            "--root-certificates", self.cert("ca.crt"),
            "--superexec-auth-secret-file", self.cert("superexec-superlink.secret"),
        ])

    def supernode_command(self, partition_id: int, private_key: str, runtime_port: int, *extra: str) -> list[str]:
        return [
            find_executable("flower-supernode"),
            "--superlink", self.superlink_address,
            "--node-config", f"partition-id={partition_id} num-partitions={NUM_SUPERNODES}",
            "--auth-supernode-private-key", private_key,
            "--host", "127.0.0.1",
            "--port", str(runtime_port),
            *extra,
        ]

    def start_supernode(self, partition_id: int) -> None:
        name = SUPERNODES[partition_id]
        runtime_port = free_port()
        secret = self.cert(f"superexec-{name}.secret")
        self.start(name, self.supernode_command(
            partition_id, self.cert(name), runtime_port,
            "--root-certificates", self.cert("ca.crt"),
            "--isolation", "process",
            "--superexec-auth-secret-file", secret,
        ))
        self.start(CLIENTAPP_SUPEREXECS[partition_id], [
            find_executable("flower-superexec"),
            "--insecure",
            "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--superexec-auth-secret-file", secret,
        ])

    def start_missing_supernodes(self) -> None:
        """Start every SuperNode (with its SuperExec) that is not running, then wait for all."""
        for partition_id, name in enumerate(SUPERNODES):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                self.start_supernode(partition_id)
        self.wait_for(lambda: self.online_nodes() == NUM_SUPERNODES, "3 online SuperNodes", "superlink")

    def crash(self, *names: str) -> None:
        """SIGKILL the named processes and their process groups, as a power loss would."""
        for name in names:
            process = self.processes[name]
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    def node_id(self, name: str) -> int:
        """Return the node id that the SuperNode ``name`` logged when it joined."""
        match = re.search(r"SuperNode ID: (\d+)", self.log(name))
        assert match, f"{name} has not logged its node id:\n{self.log(name)[-2000:]}"
        return int(match.group(1))

    def flwr(self, *arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [find_executable("flwr"), *arguments],
            env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False,
        )

    def online_nodes(self) -> int:
        completed = self.flwr("supernode", "list", TLS_CONNECTION, "--format", "json")
        try:
            nodes = json.loads(completed.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            return 0
        return sum(node["status"] == "online" for node in nodes)

    def wait_for(self, condition, description: str, process_name: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            process = self.processes[process_name]
            if process.poll() is not None:
                pytest.fail(f"{process_name} exited with code {process.returncode}:\n{self.logs_tail()}")
            if condition():
                return
            time.sleep(POLL_SECONDS)
        pytest.fail(f"timed out after {STARTUP_TIMEOUT_SECONDS:.0f} s waiting for {description}:\n{self.logs_tail()}")


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    """A SuperLink with TLS and SuperNode authentication, its SuperExec, and registered node keys."""
    root = Path(tempfile.mkdtemp(prefix="otfuse-deploy-"))
    deployment = Deployment(root)
    try:
        generate_certs(deployment.certs_dir)
        deployment.write_flower_config()
        deployment.start_superlink()
        registered = subprocess.run(
            ["bash", str(REGISTER_SUPERNODES), deployment.superlink_address, deployment.cert("ca.crt"),
             *(deployment.cert(f"{name}.pub") for name in SUPERNODES)],
            env=deployment.env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert registered.returncode == 0, registered.stderr + registered.stdout
        yield deployment
    finally:
        deployment.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def run_config_line(values: Mapping[str, object]) -> str:
    """Format run-config values as one ``flwr run --run-config`` string."""
    parts = []
    for key, value in values.items():
        assert isinstance(value, (str, int, float)) and not isinstance(value, bool), (key, value)
        assert "'" not in str(value), f"{key}: a quote in {value!r} would end the TOML string"
        parts.append(f"{key}='{value}'" if isinstance(value, str) else f"{key}={value}")
    return " ".join(parts)


@pytest.mark.slow
def test_tls_deployment_runs_two_rounds(deployment, data_dir):
    for partition_id in range(NUM_SUPERNODES):
        deployment.start_supernode(partition_id)
    deployment.wait_for(lambda: deployment.online_nodes() == NUM_SUPERNODES, "3 online SuperNodes", "superlink")
    output_dir = deployment.root / "outputs"
    values = small_run_config(
        data_dir,
        **{
            "num-server-rounds": ROUNDS,
            "min-train-nodes": NUM_SUPERNODES,
            "min-available-nodes": NUM_SUPERNODES,
            "output-dir": str(output_dir),
        },
    )

    completed = deployment.flwr(
        "run", str(REPOSITORY), TLS_CONNECTION, "--stream", "--run-config", run_config_line(values),
        timeout=RUN_TIMEOUT_SECONDS,
    )

    match = run_command.RUN_ID_PATTERN.search(completed.stdout)
    assert match, completed.stdout[-3000:] + completed.stderr[-3000:]
    run_id = int(match.group(1))
    status, details = run_command.run_status(deployment.env, run_id, TLS_CONNECTION)
    assert status == run_command.COMPLETED, f"{status} {details}\n{completed.stdout[-3000:]}\n{deployment.logs_tail()}"
    records = [record for record in read_metrics(output_dir / "metrics.jsonl") if record["run_id"] == run_id]
    assert [record["round"] for record in records] == list(range(ROUNDS + 1))
    assert {record["strategy"] for record in records} == {"otfusion"}
    assert records[-1]["fusion"]["num_models"] == NUM_SUPERNODES
    assert records[-1]["fusion"]["dropped_nodes"] == []
    assert len(records[-1]["client_train"]) == NUM_SUPERNODES


def wait_for_round(metrics_path: Path, server_round: int, run: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if metrics_path.is_file() and any(record["round"] >= server_round for record in read_metrics(metrics_path)):
            return
        assert run.poll() is None, f"flwr run exited with {run.returncode} before round {server_round}"
        time.sleep(POLL_SECONDS)
    pytest.fail(f"round {server_round} did not finish within {RUN_TIMEOUT_SECONDS} s")


@pytest.mark.slow
def test_killed_supernode_leaves_others_fused(deployment, data_dir):
    deployment.start_missing_supernodes()
    victim = SUPERNODES[1]
    victim_id = deployment.node_id(victim)
    output_dir = deployment.root / "outputs-killed-node"
    rounds = 3
    values = small_run_config(
        data_dir,
        **{
            "num-server-rounds": rounds,
            "min-train-nodes": 2,
            "min-available-nodes": 2,
            "min-train-replies": 2,
            # A bound for the wait if the SuperLink never reported the lost node.
            "round-timeout": 300.0,
            "output-dir": str(output_dir),
        },
    )
    run = subprocess.Popen(
        [find_executable("flwr"), "run", str(REPOSITORY), TLS_CONNECTION, "--stream",
         "--run-config", run_config_line(values)],
        env=deployment.env, cwd=deployment.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # Round 2 starts as soon as round 1 is recorded, so the node dies during round 2.
        wait_for_round(output_dir / "metrics.jsonl", 1, run)
        deployment.crash(victim, CLIENTAPP_SUPEREXECS[1])
        output, _ = run.communicate(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()

    match = run_command.RUN_ID_PATTERN.search(output)
    assert match, output[-3000:]
    status, details = run_command.run_status(deployment.env, int(match.group(1)), TLS_CONNECTION)
    assert status == run_command.COMPLETED, f"{status} {details}\n{output[-3000:]}\n{deployment.logs_tail()}"
    assert f"lost node {victim_id} in round 2" in output, output[-5000:]
    records = read_metrics(output_dir / "metrics.jsonl")
    assert [record["round"] for record in records] == list(range(rounds + 1))
    assert records[1]["fusion"]["num_models"] == NUM_SUPERNODES
    round_2, round_3 = records[2]["fusion"], records[3]["fusion"]
    assert round_2["num_models"] == NUM_SUPERNODES - 1
    assert round_2["failed_nodes"] + round_2["missing_nodes"] == [victim_id]
    assert round_2["skipped"] is None
    assert round_3["num_models"] == NUM_SUPERNODES - 1
    assert round_3["skipped"] is None
    assert len(records[3]["client_train"]) == NUM_SUPERNODES - 1


@pytest.mark.slow
def test_unregistered_supernode_rejected(deployment, tmp_path):
    key = tmp_path / "unregistered"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)

    process = deployment.start("unregistered-supernode", deployment.supernode_command(
        0, str(key), free_port(), "--root-certificates", deployment.cert("ca.crt"),
    ))
    return_code = process.wait(timeout=STARTUP_TIMEOUT_SECONDS)

    log = deployment.log("unregistered-supernode")
    assert return_code != 0, log
    assert SUPERNODE_CONNECTION_FAILED in log
    assert "Failed to activate SuperNode" in log


@pytest.mark.slow
def test_client_without_ca_rejected(deployment):
    # No --root-certificates: the SuperNode falls back to the system's CAs, which do not
    # include the deployment's CA.
    process = deployment.start("supernode-without-ca", deployment.supernode_command(
        0, deployment.cert("supernode-0"), free_port(), "--max-retries", "1",
    ))
    return_code = process.wait(timeout=STARTUP_TIMEOUT_SECONDS)
    listed_without_ca = deployment.flwr("ls", NO_CA_CONNECTION)
    listed_with_ca = deployment.flwr("ls", TLS_CONNECTION)

    log = deployment.log("supernode-without-ca")
    assert return_code != 0, log
    assert SUPERNODE_CONNECTION_FAILED in log
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert listed_without_ca.returncode != 0, listed_without_ca.stdout
    assert "Connection to the SuperLink is unavailable" in listed_without_ca.stdout + listed_without_ca.stderr
    # The same command with the CA succeeds, so the CA made the difference.
    assert listed_with_ca.returncode == 0, listed_with_ca.stdout + listed_with_ca.stderr


# --- simulation on an existing Ray cluster ---------------------------------------------


def test_ray_address_must_be_host_port():
    for address in ("localhost", "ray://10.0.0.5", "10.0.0.5:port", ":6379", "10.0.0.5:70000"):
        with pytest.raises(CommandError, match="invalid Ray cluster address"):
            split_ray_address(address)

    assert split_ray_address("[::1]:6379") == ("::1", 6379)
    assert split_ray_address("10.0.0.5:6379") == ("10.0.0.5", 6379)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:6379", True), ("127.0.0.2:6379", True), ("localhost:6379", True),
     ("[::1]:6379", True), ("10.0.0.5:6379", False), ("head.example:6379", False)],
)
def test_loopback_head_detected(address, loopback):
    # A driver next to a loopback head keeps Ray's loopback node address; see run_command.
    assert is_loopback_address(address) is loopback


def test_ray_address_without_head_rejected():
    with pytest.raises(CommandError, match="no Ray cluster head accepts connections"):
        check_ray_head(f"127.0.0.1:{free_port()}")


@pytest.fixture
def ray_head(tmp_path) -> Iterator[dict]:
    """A Ray head started with ``ray start --block`` on 127.0.0.1, stopped by its process id."""
    # Ray keeps Unix sockets under the temporary folder, and a socket path may have at
    # most 107 bytes, so the folder lives directly in the system's temporary folder.
    temp_dir = Path(tempfile.mkdtemp(prefix="otfuse-rayhead-"))
    port = free_port()
    env = offline_env(tmp_path / "state")
    log_path = tmp_path / "ray-head.log"
    # With --block, `ray start` stays the parent of the head's processes, so they share its
    # process group and stop with it. `ray stop` is no option, because it stops every Ray
    # process on the machine.
    process = start_logged_process(
        [
            find_executable("ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(port),
            "--temp-dir", str(temp_dir),
            "--num-cpus", "2",
            "--include-dashboard", "false",
            "--disable-usage-stats",
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
        ],
        env=env, cwd=tmp_path, log_path=log_path,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start (exit code {process.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(POLL_SECONDS)
        yield {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir, "process": process}
    finally:
        stop_process_tree(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def driver_logs(temp_dir: Path) -> list[Path]:
    """Return the logs of Ray drivers that connected to the cluster in ``temp_dir``."""
    return sorted(temp_dir.glob("session_*/logs/python-core-driver-*.log"))


@pytest.mark.slow
def test_simulation_attaches_to_ray_cluster(ray_head, data_dir, tmp_path):
    output_dir = tmp_path / "run"
    settings = small_run_config(data_dir)
    del settings["data-dir"]  # given as --data-dir below
    # Ray's own start-up may already have written a driver log, so compare before and after.
    logs_before = set(driver_logs(ray_head["temp_dir"]))

    run = subprocess.Popen(
        [
            sys.executable, "-m", "otfuse.cli.main", "run", "--quiet",
            "--ray-address", ray_head["address"],
            "--data-dir", str(data_dir), "--rounds", str(ROUNDS), "--num-clients", "2",
            "--output-dir", str(output_dir), "--run-config", run_config_line(settings),
        ],
        env={**os.environ, **OFFLINE_SWITCHES},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = run.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        # A timed-out run must not leave its SuperLink and simulation behind for later tests.
        stop_process_tree(run)
        raise

    assert run.returncode == 0, stderr[-3000:] + stdout[-3000:]
    assert f"attaches to the Ray cluster at {ray_head['address']}" in stdout
    records = read_metrics(output_dir / "metrics.jsonl")
    assert [record["round"] for record in records] == list(range(ROUNDS + 1))
    assert set(driver_logs(ray_head["temp_dir"])) - logs_before, "no Ray driver connected to the test's Ray head"

    head = ray_head["process"]
    stop_process_tree(head)
    with pytest.raises(ProcessLookupError):
        os.killpg(head.pid, 0)
