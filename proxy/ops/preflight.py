"""What `fender run` needs from the machine, checked the same way by `run` and `validate --env`.

A policy that validates may still fail to start here: a port another process
holds, an admin token file that cannot be read, an environment variable that
is unset, an optional package that is not installed. `run` meets these as
:class:`StartupError` (one line, exit status 2); `fender validate --env` calls
the same functions before anything starts and reports each problem at the
policy line it comes from.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket
from collections.abc import Callable
from typing import Any

from proxy.options.tls import UpstreamTLSOptions
from proxy.upstream.tlscontext import TLSFileError, client_context, server_context

__all__ = [
    "StartupError",
    "ListenError",
    "bind_listener",
    "check_listener",
    "missing_packages",
    "socket_reason",
    "tls_file_problems",
]


class StartupError(Exception):
    """Fender cannot start on this machine; the message says what failed and what to do.

    ``at`` is where in the policy the cause is written (a path like ``("admin_auth",
    "token_file")``), so `validate --env` can print its line and column.
    """

    def __init__(self, message: str, at: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.at = at


class ListenError(StartupError):
    """A listener cannot bind its address."""


def socket_reason(exc: OSError) -> str:
    """The operating system's words for a socket error, lower-case: ``address already in use``."""
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc).lower() or type(exc).__name__


def bind_listener(
    bind: Callable[[str, int], socket.socket], address, label: str, at: tuple[str | int, ...]
) -> socket.socket:
    """``bind(host, port)``, turning an OSError into one line naming the listener and the address."""
    try:
        return bind(address.host, address.port)
    except OSError as exc:
        reason = socket_reason(exc)
        if exc.errno == errno.EACCES and 0 < address.port < 1024:
            reason += " (ports below 1024 need privileges: use a higher port or CAP_NET_BIND_SERVICE)"
        raise ListenError(f"cannot listen on {address} ({label}): {reason}", at) from None


def check_listener(bind: Callable[[str, int], socket.socket], address, label: str, at) -> None:
    """Bind and release at once: is the address free now? (Port 0 always is.)"""
    if address.port == 0:
        return
    bind_listener(bind, address, label, at).close()


# Optional packages a policy setting needs: (where in the policy, the value, module, pip extra).
_EXTRAS = (
    (("state", "backend"), "redis", "redis", "redis"),
    (("server", "engine"), "granian", "granian", "granian"),
)


def missing_packages(policy) -> list[StartupError]:
    """Settings whose optional package is not installed (redis for state.backend: redis, ...)."""
    problems = []
    for at, value, module, extra in _EXTRAS:
        current = policy
        for part in at:
            current = getattr(current, part)
        if current == value and importlib.util.find_spec(module) is None:
            problems.append(
                StartupError(
                    f"{'.'.join(at)}: {value} needs the {module} package (pip install 'fender[{extra}]')", at
                )
            )
    return problems


def tls_file_problems(policy) -> list[tuple[tuple[str | int, ...], str]]:
    """Build each context the policy's TLS blocks describe; every file that fails, located."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    blocks: list[tuple[tuple[str | int, ...], Any]] = []
    server_tls = getattr(policy.server, "tls", None)
    if server_tls is not None:
        blocks.append((("server", "tls"), server_tls))
    admin_tls = getattr(policy, "admin_tls", None)
    if admin_tls is not None:
        blocks.append((("admin_tls",), admin_tls))
    for name, upstream in policy.upstreams.items():
        if getattr(upstream, "tls", None) is not None:
            blocks.append((("upstreams", name, "tls"), upstream.tls))
    for at, options in blocks:
        where = ".".join(str(part) for part in at)
        try:
            if isinstance(options, UpstreamTLSOptions):
                client_context(options, where=where)
            else:
                server_context(options, where=where)
        except TLSFileError as exc:
            problems.append(((*at, exc.field), str(exc)))
    return problems
