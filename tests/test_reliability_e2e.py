"""``otfuse run`` under faults: a killed server resumes exactly, and nothing leaves the machine.

One uninterrupted four-round simulation is the reference for both tests. It runs under
``strace`` when strace is installed (``.ci/run`` installs it), so the same run also shows
every network connection that the CLI, the SuperLink, the simulation and Ray open.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from otfuse.cli.flower_env import OFFLINE_SWITCHES
from otfuse.cli.processes import process_table
from otfuse.models import load_checkpoint
from otfuse.server.outputs import read_metrics

ROUNDS = 4
KILL_AFTER_ROUND = 2
RUN_TIMEOUT_SECONDS = 600
RUN_CONFIG = (
    "datasets='sst2' partitioning='iid' iid-dataset='sst2' max-train-examples=200 "
    "max-test-examples=100 model.vocab-size=512 model.max-len=16 model.d-model=16 "
    "model.n-heads=2 model.n-layers=1 model.d-ff=32"
)
STRACE = shutil.which("strace")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="the tests read the process tree from /proc"),
]


def otfuse_run_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "otfuse.cli.main", "run", "--quiet", "--num-clients", "2", *arguments]


def new_run_arguments(data_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--data-dir", str(data_dir), "--rounds", str(ROUNDS), "--output-dir", str(output_dir),
        "--run-config", RUN_CONFIG,
    ]


def run_env() -> dict[str, str]:
    return {**os.environ, **OFFLINE_SWITCHES}


@dataclass(frozen=True)
class ReferenceRun:
    output_dir: Path
    trace: Path | None
    completed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> ReferenceRun:
    """An uninterrupted run, traced by strace where strace is installed."""
    root = tmp_path_factory.mktemp("reference")
    output_dir = root / "run"
    command = otfuse_run_command(*new_run_arguments(data_dir, output_dir))
    trace = None
    if STRACE is not None:
        trace = root / "connect.strace"
        # With --seccomp-bpf only the traced system calls stop the process, so the run
        # takes about as long as without strace.
        command = [STRACE, "-f", "--seccomp-bpf", "-e", "trace=connect,sendto", "-o", str(trace), *command]
    completed = subprocess.run(
        command, env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    return ReferenceRun(output_dir=output_dir, trace=trace, completed=completed)


def simulation_processes(root: int) -> list[int]:
    """Return the ids of the ``flwr-simulation`` processes below ``root``; each runs a ServerApp."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in process_table().items():
        children.setdefault(parent, []).append(pid)
    found, pending = [], list(children.get(root, []))
    while pending:
        pid = pending.pop()
        pending.extend(children.get(pid, []))
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-simulation" in command:
            found.append(pid)
    return found


def run_killed_after_round(data_dir: Path, output_dir: Path, server_round: int) -> int:
    """Start a run, SIGKILL its ServerApp once round ``server_round`` is checkpointed, stop the rest.

    Returns the exit status of ``otfuse run``, which must report the failure.
    """
    process = subprocess.Popen(
        otfuse_run_command(*new_run_arguments(data_dir, output_dir)),
        env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    checkpoint = output_dir / "checkpoints" / f"round-{server_round:05d}.safetensors"
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    try:
        while not checkpoint.exists():
            assert process.poll() is None, f"otfuse run exited with {process.returncode} before round {server_round}"
            assert time.monotonic() < deadline, f"no checkpoint of round {server_round} after {RUN_TIMEOUT_SECONDS} s"
            time.sleep(0.1)
        servers = simulation_processes(process.pid)
        assert servers, "no flwr-simulation process found below otfuse run"
        for pid in servers:
            os.kill(pid, signal.SIGKILL)
        # The SuperLink would notice the missing heartbeat only after about a minute, so
        # the operator's Ctrl-C comes now; otfuse run then stops what it started.
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_killed_server_resumes_to_same_model(reference_run, data_dir, tmp_path):
    output_dir = tmp_path / "run"

    killed_status = run_killed_after_round(data_dir, output_dir, KILL_AFTER_ROUND)
    resumed = subprocess.run(
        otfuse_run_command("--resume", str(output_dir)),
        env=run_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False,
    )

    assert killed_status != 0
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-3000:]
    log = (output_dir / "flower.log").read_text(errors="replace")
    match = re.search(r"Resuming after round (\d+) from ", log)
    assert match, log[-3000:]
    resumed_after = int(match.group(1))
    # The kill lands right after the checkpoint of round 2, before round 3 could finish.
    assert KILL_AFTER_ROUND <= resumed_after < ROUNDS

    records = read_metrics(output_dir / "metrics.jsonl")
    assert [record["round"] for record in records] == list(range(ROUNDS + 1))
    first_run_ids = {record["run_id"] for record in records if record["round"] <= resumed_after}
    resumed_run_ids = {record["run_id"] for record in records if record["round"] > resumed_after}
    assert len(first_run_ids) == 1
    assert len(resumed_run_ids) == 1
    assert first_run_ids != resumed_run_ids
    reference_records = read_metrics(reference_run.output_dir / "metrics.jsonl")
    for record, reference in zip(records, reference_records):
        assert record["overall"] == reference["overall"], record["round"]

    final, _ = load_checkpoint(output_dir / "model.safetensors")
    expected, _ = load_checkpoint(reference_run.output_dir / "model.safetensors")
    assert list(final) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    kept = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    assert kept == [f"round-{server_round:05d}.safetensors" for server_round in (2, 3, 4)]


# strace prints, for example:
#   1234  connect(9, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("8.8.8.8")}, 16) = 0
#   1234  connect(9, {sa_family=AF_INET6, sin6_port=htons(80), ..., inet_pton(AF_INET6, "::1", &sin6_addr), ...
_INET_ADDRESS = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)')
_INET6_ADDRESS = re.compile(r'sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"')
_FAMILY = re.compile(r"sa_family=(AF_[A-Z0-9]+)")


def is_loopback(address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return parsed.is_loopback


def outbound_calls(trace: Path) -> tuple[list[str], int]:
    """Return the traced calls that address anything but loopback, and the loopback call count.

    Unix sockets and AF_UNSPEC (which only disconnects a socket) are local by definition.
    A UDP connect that sends no packet still counts: it shows that a process chose a
    remote address, which is what the test forbids.
    """
    outbound, loopback = [], 0
    for line in trace.read_text(errors="replace").splitlines():
        family = _FAMILY.search(line)
        if family is None or family.group(1) in ("AF_UNIX", "AF_UNSPEC"):
            continue
        address = _INET_ADDRESS.search(line) or _INET6_ADDRESS.search(line)
        if address is None or not is_loopback(address.group(2)):
            outbound.append(line.strip())
        else:
            loopback += 1
    return outbound, loopback


@pytest.mark.skipif(STRACE is None, reason="strace is not installed; .ci/run installs it")
def test_simulation_connects_only_to_loopback(reference_run):
    outbound, loopback = outbound_calls(reference_run.trace)

    assert loopback > 0, "the trace shows no connection at all, so strace did not follow the run"
    assert outbound == [], "connections outside loopback:\n" + "\n".join(outbound[:20])
