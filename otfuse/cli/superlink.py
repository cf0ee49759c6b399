"""A local Flower SuperLink in simulation mode that this process starts and stops by PID.

``flwr run`` with Flower's ``:local:`` connection would start a detached SuperLink that
outlives the command, with whatever environment the first caller had. Starting it here
instead gives the SuperLink the offline environment, its own ports, and a known PID, and
lets :meth:`LocalSuperLink.stop` end it and everything it started (SuperExec, the
simulation process and Ray) when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from otfuse.cli.errors import CommandError

STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
_POLL_SECONDS = 0.2
_HEALTH_TIMEOUT_SECONDS = 0.5


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_executable(name: str) -> str:
    """Find a console script of this Python environment (``flwr``, ``flower-superlink``)."""
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search_path)
    if found is None:
        raise CommandError(
            f"{name!r} was not found next to {sys.executable} or on PATH; install Flower "
            'with pip install -e ".[test]" in this virtual environment'
        )
    return found


class LocalSuperLink:
    """A ``flower-superlink --simulation`` process bound to 127.0.0.1.

    Use it as a context manager: the SuperLink starts on entry and stops on exit, also
    when the block raises or the user presses Ctrl-C.

    Parameters
    ----------
    env : mapping
        Environment of the SuperLink and of every process it starts.
    port : int
        HTTP port of the SuperLink's Fleet, Control and ServerAppIo APIs.
    control_port : int
        Port of the deprecated separate Control API, which Flower 1.42 still opens;
        without it Flower would bind 0.0.0.0:9093.
    log_path : Path
        File that receives the SuperLink's output.
    cwd : Path
        Working folder of the SuperLink, and so of the ServerApp.
    """

    def __init__(
        self, *, env: Mapping[str, str], port: int, control_port: int, log_path: Path, cwd: Path
    ) -> None:
        self.env = dict(env)
        self.port = port
        self.control_port = control_port
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            find_executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation", "subprocess",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--control-api-address", f"127.0.0.1:{self.control_port}",
            "--disable-runtime-dependency-installation",
        ]

    def start(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Start the SuperLink in a new process group and wait until its /health endpoint returns success."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            # A new session makes the SuperLink the leader of a process group that its
            # SuperExec, simulation and Ray processes join, so stop() can reach them all.
            self.process = subprocess.Popen(
                self.command(),
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CommandError(
                    f"the local SuperLink exited with code {self.process.returncode} at start; "
                    f"see {self.log_path}"
                )
            if self.is_healthy():
                return
            time.sleep(_POLL_SECONDS)
        self.stop()
        raise CommandError(
            f"the local SuperLink did not respond on {self.address} within {timeout:.0f} s; "
            f"see {self.log_path}"
        )

    def is_healthy(self) -> bool:
        # An empty proxy map keeps a user's http_proxy setting away from this loopback request.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://{self.address}/health", timeout=_HEALTH_TIMEOUT_SECONDS) as reply:
                return 200 <= reply.status < 300
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop the SuperLink and every process it started, directly or not.

        The SuperExec that the SuperLink starts opens a session of its own, which the
        simulation and Ray join, so the process groups of all descendants are collected
        before the SuperLink goes. Each gets SIGTERM, then SIGKILL for whatever still runs
        after ``timeout`` seconds. Calling it again, or on a SuperLink that never started,
        does nothing.
        """
        if self.process is None:
            return
        groups = descendant_groups(self.process.pid) | {self.process.pid}
        groups.discard(os.getpgrp())
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for group in sorted(groups):
            _end_process_group(group, timeout)
        self.process = None

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def descendant_groups(root: int) -> set[int]:
    """Return the process groups of every process below ``root`` in the process tree."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    groups: set[int] = set()
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop()
        groups.add(table[pid][1])
        pending.extend(children.get(pid, []))
    return groups


def process_table() -> dict[int, tuple[int, int]]:
    """Map every visible process id to its (parent id, process group id).

    Reads /proc where it exists (Linux) and runs ``ps`` elsewhere.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return _process_table_from_ps()
    table = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended while the table was read
        # The command name in parentheses may contain spaces, so split after its last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _process_table_from_ps() -> dict[int, tuple[int, int]]:
    output = subprocess.run(
        ["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "pgid="],
        capture_output=True, text=True, check=True,
    ).stdout
    table = {}
    for line in output.splitlines():
        pid, parent, group = (int(value) for value in line.split())
        table[pid] = (parent, group)
    return table


def _end_process_group(group: int, timeout: float) -> None:
    """Send SIGTERM to a process group, wait for it to empty, then send SIGKILL."""
    if not _signal_group(group, signal.SIGTERM):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _signal_group(group, 0):
            return
        time.sleep(_POLL_SECONDS)
    _signal_group(group, signal.SIGKILL)


def _signal_group(group: int, signal_number: int) -> bool:
    """Signal a process group; return False when no process is left in it."""
    try:
        os.killpg(group, signal_number)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member that changed its user cannot be signalled, so it is not ours to stop.
        return False
    return True
