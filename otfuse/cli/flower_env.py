"""Environment for offline, quiet Flower and Ray runs, shared by the CLI, tests and CI.

Flower 1.42 and Ray 2.55 contact outside services unless switched off: Flower's CLI and
SuperLink post telemetry and a daily update check, the local SuperLink installs the app's
dependencies with ``uv sync`` (which downloads packages), Ray reports usage statistics,
Ray's dashboard process asks cloud metadata services (169.254.169.254) for a cluster config
unless ``$HOME/ray_bootstrap_config.yaml`` exists, and Ray finds its node address with a UDP
connect to 8.8.8.8. The variables below switch all of that off. A SuperLink reads them when
it starts and passes them to the simulation it runs, so they must be set before the
SuperLink is started.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

#: Ray's documented switch for multi-node clusters on Windows and macOS; on Linux, 0 keeps
#: every Ray process on the loopback address.
RAY_LOCAL_NODE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

#: Switches that do not depend on any path.
OFFLINE_SWITCHES: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "UV_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Silences a FutureWarning that Ray prints on every start.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray's single-machine mode, the default on Windows and macOS: the node address is
    # 127.0.0.1 instead of the interface that a UDP connect to 8.8.8.8 picks (Ray 2.55,
    # ray._private.services.get_node_ip_address). Remove it to attach to a cluster of
    # several machines.
    RAY_LOCAL_NODE_SWITCH: "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

SUPERLINK_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
CONTROL_PORT_ENV = "FLWR_LOCAL_CONTROL_API_PORT"
RAY_BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"

# Ray keeps Unix sockets under RAY_TMPDIR/session_<date>_<pid>/sockets/, and a socket path
# may have at most 107 bytes on Linux, so a deep project folder falls back to the system's
# temporary folder.
_MAX_RAY_TMPDIR_LENGTH = 40


def state_paths(state_dir: str | os.PathLike) -> dict[str, Path]:
    """Return the folders under ``state_dir`` that the environment points at."""
    root = Path(state_dir).resolve()
    ray_tmp = root / "ray"
    if len(str(ray_tmp)) > _MAX_RAY_TMPDIR_LENGTH:
        ray_tmp = Path(tempfile.gettempdir()) / f"otfuse-ray-{os.getuid()}"
    return {"flwr_home": root / "flwr-home", "ray_tmp": ray_tmp, "home": root / "home"}


def prepare_state_dir(state_dir: str | os.PathLike) -> dict[str, Path]:
    """Create the folders of :func:`state_paths` and the empty Ray bootstrap config."""
    paths = state_paths(state_dir)
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    bootstrap = paths["home"] / RAY_BOOTSTRAP_CONFIG
    if not bootstrap.exists():
        bootstrap.write_text("{}\n")
    return paths


def offline_env(
    state_dir: str | os.PathLike,
    base: Mapping[str, str] | None = None,
    *,
    superlink_port: int | None = None,
    control_port: int | None = None,
) -> dict[str, str]:
    """Return ``base`` (default: ``os.environ``) plus the offline switches and local folders.

    ``FLWR_HOME``, ``RAY_TMPDIR`` and ``HOME`` point into ``state_dir``, which is created.
    ``HOME`` holds only the Ray bootstrap config, so packages installed with ``pip --user``
    are not visible to processes started with this environment; use a virtual environment.
    The ports, when given, set where Flower's CLI looks for its local SuperLink.
    """
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_SWITCHES)
    paths = prepare_state_dir(state_dir)
    env["FLWR_HOME"] = str(paths["flwr_home"])
    env["RAY_TMPDIR"] = str(paths["ray_tmp"])
    env["HOME"] = str(paths["home"])
    if superlink_port is not None:
        env[SUPERLINK_PORT_ENV] = str(superlink_port)
    if control_port is not None:
        env[CONTROL_PORT_ENV] = str(control_port)
    return env
