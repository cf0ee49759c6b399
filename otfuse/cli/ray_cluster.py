"""Attach the Flower simulation to a running Ray cluster instead of a Ray instance of its own.

Flower 1.42's simulation backend calls ``ray.init()`` with only the ``init-args-*`` keys of
the federation config (CPUs, GPUs, logging level, log to driver), so no cluster address
can travel that way: ``--federation-config "init-args-address=..."`` is rejected as an
unknown field. ``ray.init()`` without an address reads the ``RAY_ADDRESS`` environment
variable, though, and the simulation process inherits the environment of the SuperLink
that starts it. ``otfuse run`` therefore sets ``RAY_ADDRESS`` for the SuperLink it starts.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

from otfuse.cli.errors import CommandError

RAY_ADDRESS_ENV = "RAY_ADDRESS"
#: Seconds to wait for the cluster's head to accept a TCP connection before the run starts.
CONNECT_TIMEOUT_SECONDS = 5.0


def resolve_ray_address(option: str | None, environ: Mapping[str, str]) -> str | None:
    """Return the cluster address from ``--ray-address``, else from ``RAY_ADDRESS``, else None.

    None means that the simulation starts and stops a Ray instance of its own.
    """
    address = option if option is not None else environ.get(RAY_ADDRESS_ENV, "")
    address = address.strip()
    return address or None


def split_ray_address(address: str) -> tuple[str, int]:
    """Split a Ray head address ``HOST:PORT`` (IPv6 hosts in brackets) into host and port."""
    host, separator, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise CommandError(
            f"invalid Ray cluster address {address!r}: expected HOST:PORT of the head's GCS "
            "server, as printed by `ray start --head` (for example 10.0.0.5:6379)"
        )
    return host, int(port_text)


def check_ray_head(address: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Raise :class:`CommandError` unless the head at ``address`` accepts a TCP connection.

    Without this check, a wrong address would surface only inside the simulation, after
    the SuperLink, the app bundle and the ServerApp have started.
    """
    host, port = split_ray_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        raise CommandError(
            f"no Ray cluster head accepts connections at {address} ({error}); start one with "
            f"`ray start --head --port {port}` on {host}, or correct --ray-address or "
            f"{RAY_ADDRESS_ENV}"
        ) from None


def is_loopback_address(address: str) -> bool:
    """Return whether the head of ``HOST:PORT`` is this machine's loopback interface.

    A driver on the head's machine must then announce a loopback node address too: Ray
    accepts a driver only when its node address is the head's or one of the raylets'.
    """
    host, _ = split_ray_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
