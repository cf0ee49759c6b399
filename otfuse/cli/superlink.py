"""A local Flower SuperLink in simulation mode that this process starts and stops by PID.

``flwr run`` with Flower's ``:local:`` connection would start a detached SuperLink that
outlives the command, with whatever environment the first caller had. Starting it here
instead gives the SuperLink the offline environment, its own ports, and a known PID, and
lets :meth:`LocalSuperLink.stop` end it and everything it started (SuperExec, the
simulation process and Ray) when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from otfuse.cli.errors import CommandError
from otfuse.cli.processes import (
    STOP_TIMEOUT_SECONDS,
    find_executable,
    is_healthy,
    start_logged_process,
    stop_process_tree,
)

STARTUP_TIMEOUT_SECONDS = 60.0
_POLL_SECONDS = 0.2


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
        # A new session makes the SuperLink the leader of a process group that its
        # SuperExec, simulation and Ray processes join, so stop() can reach them all.
        self.process = start_logged_process(
            self.command(), env=self.env, cwd=self.cwd, log_path=self.log_path
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
        return is_healthy(f"http://{self.address}/health")

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
        stop_process_tree(self.process, timeout)
        self.process = None

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
