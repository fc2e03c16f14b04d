"""A private redis-server for tests: free port on 127.0.0.1, no persistence, stopped by PID.

Use the session fixture ``redis_server`` (import ``redis_server_fixture`` into the test module). It
skips when redis-server is not installed, except under CI=true, where it
fails. Tests never connect to any other Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from tests.support.need import missing

INSTALL_HINT = "redis-server not installed: apt-get install redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server subprocess; ``stop()`` and ``start()`` again keep the same port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
            if _ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}")

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # abrupt on purpose: the tests model a crash
            proc.wait(timeout=10)
        self.proc = None

    def command(self, *args: str | bytes) -> bytes:
        """One command over a plain socket (RESP), for checks that must not go through Fender."""
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"".join(parts))
            return sock.recv(65536)


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture():
    binary = redis_binary()
    if binary is None:
        missing(INSTALL_HINT)
    server = RedisServer(binary)
    server.start()
    yield server
    server.stop()
