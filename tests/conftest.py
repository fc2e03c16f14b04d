"""Shared fixtures: Fender in-process or as a subprocess, and a real HTTP upstream.

Everything listens on 127.0.0.1 with ephemeral ports and is stopped by the
fixture that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path
from urllib.parse import parse_qs

import httptools
import pytest
import uvicorn

from proxy.server.fender import Fender, _Server, bind_socket
from tests.support.launch import launch_fender

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_unretrieved_task_exceptions(request):
    """Every coroutine test fails when it leaves a task whose exception nobody retrieved."""
    if asyncio.iscoroutinefunction(request.function):
        request.getfixturevalue("_task_exception_guard")


@pytest.fixture
async def _task_exception_guard():
    """Watch this test's loop for tasks whose exception is never retrieved (a failure nobody saw).

    Two ways a task ends up so: freed, its ``__del__`` reports "Task exception was never
    retrieved" to the loop's exception handler (caught here); or still alive in a garbage
    cycle, not collected yet (found among the tasks the loop created, done with an exception
    never asked for). Runs before and ends after the test's other fixtures.
    """
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    created: weakref.WeakSet[asyncio.Future] = weakref.WeakSet()
    previous_factory = loop.get_task_factory()
    previous_handler = loop.get_exception_handler()

    def factory(loop, coro, **kwargs):
        if previous_factory is not None:
            task = previous_factory(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        created.add(task)
        return task

    def handler(loop, context):
        if "exception was never retrieved" in context.get("message", ""):
            reported.append(context)
        if previous_handler is not None:
            previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_task_factory(factory)
    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_task_factory(previous_factory)
        # _log_traceback: asyncio's own flag for "exception set, never retrieved" (what __del__ reports).
        unretrieved = [t for t in list(created) if t.done() and not t.cancelled() and t._log_traceback]
        found = [f"{t!r}: {t.exception()!r}" for t in unretrieved]  # exception() marks them retrieved
        found += [f"{c.get('task', c.get('future'))!r}: {c.get('exception')!r}" for c in reported]
        loop.set_exception_handler(previous_handler)
    if found:
        pytest.fail("task exception(s) never retrieved:\n  " + "\n  ".join(found), pytrace=False)


def pattern_bytes(size: int, offset: int = 0) -> bytes:
    """Deterministic body content, so both ends can hash without storing it."""
    block = bytes(range(256)) * 256  # 64 KiB
    start = offset % len(block)
    out = (block[start:] + block * (size // len(block) + 2))[:size]
    return out


class EchoUpstream:
    """A real HTTP server (uvicorn) for tests. Routes:

    - ``/stream?size=N&chunk=M``: N bytes of pattern content, chunked (no length)
    - ``/status/NNN``: that status
    - ``/slow?ms=N``: answers after N ms
    - ``/hash``: reads the request body, answers its sha256 and length as JSON
    - anything else: JSON with what arrived (method, path, query, headers, body length)
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        digest = hashlib.sha256()
        length = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            digest.update(chunk)
            length += len(chunk)
            more = message.get("more_body", False)
        record = {
            "method": scope["method"],
            "path": scope.get("raw_path", b"").decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
            "body_length": length,
            "body_sha256": digest.hexdigest(),
        }
        self.requests.append(record)
        if path.startswith("/stream"):
            size = int(query.get("size", "0"))
            step = int(query.get("chunk", str(256 * 1024)))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")],
                }
            )
            sent = 0
            while sent < size:
                n = min(step, size - sent)
                await send({"type": "http.response.body", "body": pattern_bytes(n, sent), "more_body": True})
                sent += n
            await send({"type": "http.response.body", "body": b""})
            return
        status = 200
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        if path.startswith("/slow"):
            await asyncio.sleep(int(query.get("ms", "0")) / 1000)
        body = json.dumps(record).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"x-upstream-private"),
            (b"x-upstream-private", b"do-not-forward"),
            (b"keep-alive", b"timeout=30"),
        ]
        if status in (204, 304):
            headers = [h for h in headers if h[0] != b"content-length"]
            body = b""
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})


async def start_asgi(app) -> tuple[_Server, int]:
    config = uvicorn.Config(app, loop="none", lifespan="off", log_config=None, access_log=False, ws="none")
    config.load()
    server = _Server(config)
    server.lifespan = config.lifespan_class(config)
    sock = bind_socket("127.0.0.1", 0)
    await server.startup(sockets=[sock])
    return server, sock.getsockname()[1]


async def stop_asgi(server: _Server) -> None:
    """Stop a test server from start_asgi at once: the test is over, so nothing is drained.

    Its connections are aborted and its request tasks cancelled, then it closes (no wait
    for idle keep-alive connections, no fixed sleep).
    """
    state = server.server_state
    for connection in list(state.connections):
        connection.transport.abort()
    for task in list(state.tasks):
        task.cancel()
    server.should_exit = True
    for _ in range(100):  # bounded: aborted transports report connection_lost within a few loop turns
        if not state.connections and not state.tasks:
            break
        await asyncio.sleep(0)
    await server.shutdown()


@pytest.fixture
async def echo_upstream():
    app = EchoUpstream()
    server, port = await start_asgi(app)
    app.port = port
    yield app
    await stop_asgi(server)


def policy_text(upstream_port: int, routes: str = "", upstreams: str = "", server: str = "") -> str:
    """A test policy: one upstream 'echo' on the given port plus whatever the test adds."""
    routes = (
        routes
        or """
      - name: all
        upstream: echo
    """
    )
    return (
        textwrap.dedent(
            f"""
            listen: 127.0.0.1:0
            admin: 127.0.0.1:0
            upstreams:
              echo:
                replicas: [{{url: http://127.0.0.1:{upstream_port}}}]
            """
        )
        + textwrap.indent(textwrap.dedent(upstreams), "  ")
        + ("server:\n" + textwrap.indent(textwrap.dedent(server), "  ") if server else "")
        + "routes:\n"
        + textwrap.indent(textwrap.dedent(routes), "  ")
    )


@pytest.fixture
async def start_fender():
    started: list[Fender] = []

    async def start(text: str, clock=None) -> Fender:
        fender = await launch_fender(text, clock=clock)
        started.append(fender)
        return fender

    yield start
    for fender in started:
        await fender.stop()


class _FirstResponse:
    """Feeds a response stream to httptools and tells when the first final (non-1xx) response ended."""

    def __init__(self, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only  # a response to HEAD has no body, whatever its Content-Length says
        self.done = False

    def _final(self) -> bool:
        status = self.parser.get_status_code()
        return status >= 200 or status == 101

    def on_headers_complete(self) -> None:
        if self.head_only and self._final():
            self.done = True

    def on_message_complete(self) -> None:
        if self._final():
            self.done = True


async def raw_request(
    port: int, data: bytes | list[bytes], timeout: float = 5.0, *, until_close: bool = False
) -> bytes:
    """Send hand-written bytes; return the first response as it arrived, read as far as its framing
    says (status line and headers, then a Content-Length or chunked body; a body without framing
    runs to the close). ``until_close=True`` returns everything until the server closes instead.

    Bounded by ``timeout``: whatever arrived by then (an incomplete answer fails the caller's checks).
    """
    first = data if isinstance(data, bytes) else data[0]
    response = _FirstResponse(head_only=first.startswith(b"HEAD "))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        for part in [data] if isinstance(data, bytes) else data:
            writer.write(part)
            await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while not response.done:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    out += chunk
                    if not until_close:
                        try:
                            response.parser.feed_data(chunk)
                        except httptools.HttpParserError:
                            break  # not HTTP: the caller sees the bytes
        return out
    finally:
        writer.close()


class FenderProcess:
    """Fender as a real subprocess (`python -m proxy run`), for CLI and memory tests."""

    def __init__(self, policy_path: Path) -> None:
        self.policy_path = policy_path
        self.proc: subprocess.Popen | None = None

    def start(self, port: int, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", str(self.policy_path), "--log-level", "warning"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fender exited: {self.proc.stderr.read().decode()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("fender did not start listening")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        # SIGINT drains like SIGTERM (in-flight requests finish, the checkpoint is written) but
        # skips drain.delay, so teardown does not wait the 5s default; test_drain sends SIGTERM itself.
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Bounded wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fender_process(tmp_path):
    procs: list[FenderProcess] = []

    def make(text: str) -> FenderProcess:
        path = tmp_path / f"policy-{len(procs)}.yaml"
        path.write_text(text)
        proc = FenderProcess(path)
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.stop()


# Test kinds, by file (docs/development.md): select with -m unit, -m e2e, -m external. A file not
# listed is e2e, the kind most test files are; a file whose tests need a system tool is external
# (and e2e). A test may carry its own mark instead.
UNIT_FILES = {
    "test_cache_policy.py",
    "test_config.py",
    "test_dns_refresh.py",
    "test_metrics_fast.py",
    "test_mutate_list.py",
    "test_paths_headers_router.py",
    "test_schema_docs.py",
}
EXTERNAL_FILES = {
    "test_cache_rfc_round2.py",  # redis-server (its fleet cases)
    "test_deploy.py",  # promtool
    "test_dns.py",  # dnsmasq
    "test_fleet.py",  # redis-server
    "test_leases.py",  # redis-server
    "test_purge.py",  # redis-server
    "test_redis_modes.py",  # redis-server, redis-cli
    "test_status_page.py",  # chromium
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(kind) for kind in ("unit", "e2e", "external")):
            continue
        name = item.path.name
        if name in UNIT_FILES:
            item.add_marker(pytest.mark.unit)
            continue
        item.add_marker(pytest.mark.e2e)
        if name in EXTERNAL_FILES:
            item.add_marker(pytest.mark.external)
