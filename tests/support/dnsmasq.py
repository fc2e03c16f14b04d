"""A real DNS server for tests: dnsmasq on 127.0.0.1, a free port, names from files the test writes.

::

    async with Dnsmasq(tmp_path, {"svc.test": ["127.0.0.2", "127.0.0.3"]}) as dns:
        policy = f'dns: {{resolvers: ["127.0.0.1:{dns.port}"]}} ...'
        await dns.set_hosts({"svc.test": ["127.0.0.2"]})   # rewrites the hosts file, SIGHUP, waits
        await dns.stop(); await dns.start()                 # the server gone, and back on the same port

It runs ``--no-resolv --no-hosts --addn-hosts FILE --local-ttl 1`` (answers live one second),
``local=/test/`` (a name under .test that is not in the file is NXDOMAIN, not REFUSED) and
SRV records from its config file (``srv=[(name, target, port, priority, weight)]``; change
them with :meth:`set_srv`, which restarts it: dnsmasq reads its config only at start). The
process is stopped by PID. Without dnsmasq the test skips with the install command (fails
under CI=true).
"""

from __future__ import annotations

import asyncio
import getpass
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.need import missing

SrvRecord = tuple[str, str, int, int, int]  # name, target, port, priority, weight


def _free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


class Dnsmasq:
    def __init__(
        self,
        directory: Path,
        hosts: dict[str, list[str]],
        srv: list[SrvRecord] = (),  # type: ignore[assignment]
    ) -> None:
        if shutil.which("dnsmasq") is None and not Path("/usr/sbin/dnsmasq").exists():
            missing("dnsmasq not installed: apt-get install -y dnsmasq")
        self.binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.directory = directory
        self.hosts_file = directory / "dns-hosts"
        self.conf_file = directory / "dnsmasq.conf"
        self.hosts = dict(hosts)
        self.srv = list(srv)
        self.port = _free_udp_tcp_port()
        self.proc: subprocess.Popen | None = None

    async def __aenter__(self) -> Dnsmasq:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _write(self) -> None:
        lines = [f"{address} {name}" for name, addresses in self.hosts.items() for address in addresses]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        conf = ["local=/test/"]
        conf += [f"srv-host={n},{t},{port},{prio},{weight}" for n, t, port, prio, weight in self.srv]
        self.conf_file.write_text("\n".join(conf) + "\n")

    async def start(self) -> None:
        """Start (again, on the same port) and wait until it answers. A restart may find the port
        held a moment longer (the old sockets closing): it tries again, a bounded number of times."""
        for attempt in range(20):
            try:
                await self._start_once()
                return
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == 19:
                    raise
                self.proc = None
                await asyncio.sleep(0.1)  # bounded retry of a bind, not a synchronisation

    async def _start_once(self) -> None:
        self._write()
        self.proc = await asyncio.to_thread(
            subprocess.Popen,
            [
                self.binary,
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                f"--addn-hosts={self.hosts_file}",
                "--local-ttl=1",
                f"--conf-file={self.conf_file}",
                "--pid-file=",
                f"--user={getpass.getuser()}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        await self._wait(lambda: self._ask("dnsmasq-ready.test") is not None, "dnsmasq answering")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
        if proc.stderr is not None:
            proc.stderr.close()

    async def set_hosts(self, hosts: dict[str, list[str]]) -> None:
        """New addresses: rewrite the hosts file, SIGHUP (dnsmasq re-reads it), wait until it answers so."""
        self.hosts = dict(hosts)
        self._write()
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGHUP)

        def current() -> bool:
            for name, addresses in hosts.items():
                answer = self._ask(name)
                if answer is None or sorted(answer) != sorted(addresses):
                    return False
            return True

        await self._wait(current, f"dnsmasq answering {hosts}")

    async def set_srv(self, srv: list[SrvRecord]) -> None:
        """New SRV records: dnsmasq reads them from its config at start only, so restart it."""
        self.srv = list(srv)
        await self.stop()
        await self.start()

    def _ask(self, name: str) -> list[str] | None:
        """The A addresses dnsmasq gives for ``name`` now ([] for NXDOMAIN), or None when it does not answer."""
        import dns.exception
        import dns.message
        import dns.query
        import dns.rcode

        query = dns.message.make_query(name, "A")
        try:
            response = dns.query.udp(query, "127.0.0.1", timeout=0.2, port=self.port)
        except (OSError, dns.exception.Timeout):
            return None
        if response.rcode() == dns.rcode.NXDOMAIN:
            return []
        return [r.address for rrset in response.answer for r in rrset if hasattr(r, "address")]

    async def _wait(self, predicate, what: str, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"dnsmasq exited with {self.proc.returncode}: {err.strip()}")
            if await asyncio.to_thread(predicate):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"not reached within {within}s: {what}")
            await asyncio.sleep(0.05)
