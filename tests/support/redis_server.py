"""A private redis-server for tests: free port on 127.0.0.1, no persistence, stopped by PID.

Use the session fixture ``redis_server`` (import ``redis_server_fixture`` into the test module). It
skips when redis-server is not installed, except under CI=true, where it
fails. Tests never connect to any other Redis.
"""

from __future__ import annotations

import os
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
        self.args: list[str] = []  # before the options (a sentinel's config file)
        self.extra: list[str] = []  # after them

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                *self.args,
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
                *self.extra,
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
            reply = sock.recv(65536)
            # A bulk string (CLUSTER NODES, INFO) may come in several reads: read it whole (bounded).
            if reply.startswith(b"$") and b"\r\n" in reply:
                size = int(reply[1 : reply.index(b"\r\n")])
                whole = reply.index(b"\r\n") + 2 + max(size, 0) + 2
                for _ in range(64):
                    if len(reply) >= whole:
                        break
                    more = sock.recv(65536)
                    if not more:
                        break
                    reply += more
            return reply


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


# --------------------------------------------------------------------------- Cluster and Sentinel


def _bulk(reply: bytes) -> str:
    """The text of a RESP bulk string reply (``$N\\r\\n...\\r\\n``)."""
    head, _, rest = reply.partition(b"\r\n")
    if not head.startswith(b"$"):
        raise RuntimeError(f"not a bulk string: {reply[:80]!r}")
    return rest[: int(head[1:])].decode(errors="replace")


def _fields(reply: bytes) -> dict[str, str]:
    """``key:value`` lines of an INFO or CLUSTER INFO reply."""
    return dict(line.split(":", 1) for line in _bulk(reply).splitlines() if ":" in line)


def redis_cli() -> str | None:
    return shutil.which("redis-cli")


def _need(binary: str | None, hint: str) -> str:
    if binary is None:
        missing(hint)  # skips with the hint; fails under CI=true
    return binary


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too (bounded tries)."""
    for _ in range(200):
        port = _free_port()
        if port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNodeServer(RedisServer):
    """One redis-server of a Cluster: cluster mode on, its nodes file in ``workdir``."""

    def __init__(self, binary: str, workdir: str, node_timeout_ms: int) -> None:
        super().__init__(binary)
        self.port = _cluster_port()
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms

    def start(self, timeout: float = 10.0) -> None:
        self.extra = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            os.path.join(self.workdir, f"nodes-{self.port}.conf"),
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            # A replica syncs at once (the default waits 5 s for more replicas): a replica that never
            # synced refuses to fail over (its data age counts from the epoch).
            "--repl-diskless-sync-delay",
            "0",
            "--dir",
            self.workdir,
        ]
        super().start(timeout)


class RedisCluster:
    """``masters`` masters with one replica each, joined with redis-cli --cluster create."""

    def __init__(
        self, binary: str, cli: str, workdir: str, masters: int = 3, node_timeout_ms: int = 1000
    ) -> None:
        self.cli = cli
        self.nodes = [ClusterNodeServer(binary, workdir, node_timeout_ms) for _ in range(masters * 2)]

    @property
    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [self.cli, "--cluster", "create", *self.seeds, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self.wait_ok(timeout)
        self.wait_replicas_linked(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Bounded wait until every running node says cluster_state:ok."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [n for n in self.nodes if n.proc is not None]
            if all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in alive):
                return
            time.sleep(0.05)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def view(self, node: ClusterNodeServer) -> tuple[str, dict[tuple[int, int], tuple[int, str]]]:
        """One node's view: its cluster_state, and each slot range's master (port, flags)."""
        state = _fields(node.command("CLUSTER", "INFO")).get("cluster_state", "?")
        ranges: dict[tuple[int, int], tuple[int, str]] = {}
        for line in _bulk(node.command("CLUSTER", "NODES")).splitlines():
            fields = line.split()
            if len(fields) < 9 or "master" not in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit():
                    ranges[(int(low), int(high or low))] = (port, fields[2])
        return state, ranges

    def ranges_of(self, master: ClusterNodeServer) -> list[tuple[int, int]]:
        """The slot ranges ``master`` serves, as ``master`` itself says."""
        return [r for r, (port, _) in self.view(master)[1].items() if port == master.port]

    def wait_promoted(
        self, victim: ClusterNodeServer, ranges: list[tuple[int, int]], timeout: float = 30.0
    ) -> ClusterNodeServer:
        """Bounded wait, after the master ``victim`` serving ``ranges`` was stopped (or failed over), until every running
        node says cluster_state:ok and names the same other running, non-failed master for all of
        ``ranges`` (the promoted replica); that node."""
        deadline = time.monotonic() + timeout
        running = {n.port: n for n in self.nodes if n.proc is not None}
        while time.monotonic() < deadline:
            owners: set[int] = set()
            ok = True
            for node in running.values():
                state, view = self.view(node)
                ok = ok and state == "ok"
                for r in ranges:
                    port, flags = view.get(r, (0, "none"))
                    owners.add(0 if "fail" in flags else port)
            if ok and len(owners) == 1:
                (port,) = owners
                if port != victim.port and port in running:
                    return running[port]
            time.sleep(0.05)
        raise RuntimeError(f"no replica took over the slots of the master on port {victim.port}")

    def replica_of(self, master: ClusterNodeServer) -> ClusterNodeServer:
        """A running replica of ``master`` (INFO replication)."""
        for node in self.nodes:
            if node.proc is not None and node is not master:
                if _fields(node.command("INFO", "replication")).get("master_port") == str(master.port):
                    return node
        raise RuntimeError(f"the master on port {master.port} has no running replica")

    def wait_replicas_linked(self, timeout: float = 30.0) -> None:
        """Bounded wait until every running replica has synced with its master (link up).

        Only a replica that synced can be promoted: one whose link never came up counts its data as
        too old (cluster-replica-validity-factor) and never starts a failover.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [_fields(n.command("INFO", "replication")) for n in self.nodes if n.proc is not None]
            if all(i.get("master_link_status") == "up" for i in infos if i.get("role") == "slave"):
                return
            time.sleep(0.05)
        raise RuntimeError("the replicas did not sync with their masters")

    def master_of(self, key: bytes) -> ClusterNodeServer:
        """The running master serving ``key``'s slot, as a running node sees the cluster."""
        node = next(n for n in self.nodes if n.proc is not None)
        slot = int(node.command("CLUSTER", "KEYSLOT", key)[1:-2])
        for line in node.command("CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if len(fields) < 9 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no master serves {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelSetup:
    """One master, one replica, three sentinels watching them as ``service``."""

    def __init__(self, binary: str, workdir: str, service: str = "fender") -> None:
        self.binary = binary
        self.workdir = workdir
        self.service = service
        self.master = RedisServer(binary)
        self.replica = RedisServer(binary)
        self.sentinels = [RedisServer(binary) for _ in range(3)]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def start(self) -> None:
        self.master.start()
        self.replica.extra = ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica.start()
        for sentinel in self.sentinels:
            conf = os.path.join(self.workdir, f"sentinel-{sentinel.port}.conf")
            with open(conf, "w") as f:
                f.write(
                    f"port {sentinel.port}\nbind 127.0.0.1\n"
                    f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {self.service} 500\n"
                    f"sentinel failover-timeout {self.service} 5000\n"
                )
            sentinel.args = [conf, "--sentinel"]
            sentinel.start()

    def master_port(self) -> int:
        reply = self.sentinels[0].command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(reply.split(b"\r\n")[4])

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.stop()


@pytest.fixture(name="redis_cluster")
def redis_cluster_fixture(tmp_path):
    binary = _need(redis_binary(), INSTALL_HINT)
    cli = _need(redis_cli(), "redis-cli not installed: apt-get install redis-tools")
    cluster = RedisCluster(binary, cli, str(tmp_path))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(name="redis_sentinel")
def redis_sentinel_fixture(tmp_path):
    setup = SentinelSetup(_need(redis_binary(), INSTALL_HINT), str(tmp_path))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()
