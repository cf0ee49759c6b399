"""Start and stop the local processes of a Flower run by their ids.

Flower's SuperLink, SuperNodes and SuperExecs start further processes (ServerApps,
ClientApps, simulations, Ray) that may open sessions of their own. The helpers here start
each top-level process as the leader of a new session and stop it together with the
process groups of everything below it, so that nothing is left running when a run ends,
fails or is interrupted. Processes are never looked up by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from otfuse.cli.errors import CommandError

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


def start_logged_process(
    command: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``command`` as the leader of a new session, with its output appended to ``log_path``.

    The new session gives the process a group of its own that its children join unless
    they open their own session, so :func:`stop_process_tree` can reach all of them.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process_tree(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """Stop ``process`` and every process it started, directly or not.

    The process groups of all descendants are collected before ``process`` goes, because
    its children are re-parented when it exits. Each group gets SIGTERM, then SIGKILL for
    whatever still runs after ``timeout`` seconds. The group of the calling process is
    spared. For a process that has exited already, only its own group is left to stop.
    """
    groups = descendant_groups(process.pid) | {process.pid}
    groups.discard(os.getpgrp())
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for group in sorted(groups):
        _end_process_group(group, timeout)


def is_healthy(url: str, *, ssl_context: ssl.SSLContext | None = None) -> bool:
    """Return whether a GET of ``url`` (a Flower ``/health`` endpoint) succeeds."""
    # An empty proxy map keeps a user's http_proxy setting away from this loopback request.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=_HEALTH_TIMEOUT_SECONDS) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError):
        return False


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
