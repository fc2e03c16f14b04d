"""The error log of upstream faults (fender.upstream) and the access log (fender.access, text and json).

Unit tests drive the line limiter with a ManualClock; end-to-end tests run a real Fender against
real sockets (a port nothing listens on, a RawUpstream that resets, hangs or sends a huge head)
and read the lines the loggers wrote.
"""

from __future__ import annotations

import json
import logging
import re
import socket

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.cluster.faultlog import FaultLog, LineLimiter
from proxy.config import PolicyError, load_policy, parse_policy
from proxy.dataplane.accesslog import AccessLog, _BareLines
from proxy.policies.cache.status import cache_result
from proxy.server.fender import Fender, bind_socket
from proxy.upstream import ConnectFailure
from proxy.upstream.errors import os_words
from tests.conftest import free_port, policy_text
from tests.support.procs import wait_until
from tests.support.raw_upstream import RawUpstream, hang, ok, raw, reset, sequence

# --------------------------------------------------------------------------- the line limiter


def test_limiter_writes_one_line_per_key_per_interval_and_counts_what_it_held_back():
    clock = ManualClock()
    limiter = LineLimiter(interval=10.0, max_keys=16, clock=clock)
    assert limiter.admit(("a:1", "connect_failure")) == (0, 0.0)
    for _ in range(5):
        clock.advance(1.0)
        assert limiter.admit(("a:1", "connect_failure")) is None
    # Another reason of the same replica, and another replica, have their own allowance.
    assert limiter.admit(("a:1", "timeout")) == (0, 0.0)
    assert limiter.admit(("b:1", "connect_failure")) == (0, 0.0)
    clock.advance(4.9)  # 9.9 s after the first line
    assert limiter.admit(("a:1", "connect_failure")) is None
    clock.advance(0.1)
    held, since = limiter.admit(("a:1", "connect_failure"))
    assert held == 6 and since == pytest.approx(10.0)
    # The count starts again from the line just written.
    clock.advance(10.0)
    assert limiter.admit(("a:1", "connect_failure")) == (0, pytest.approx(10.0))


def test_limiter_remembers_at_most_max_keys_forgetting_the_one_written_longest_ago():
    clock = ManualClock()
    limiter = LineLimiter(interval=10.0, max_keys=3, clock=clock)
    for key in ("k0", "k1", "k2"):
        limiter.admit(key)
        clock.advance(1.0)
    clock.advance(10.0)
    limiter.admit("k0")  # written again: now the most recent
    limiter.admit("k3")  # a fourth key: k1 (written longest ago) is forgotten
    assert len(limiter) == 3
    assert limiter.admit("k0") is None  # remembered: inside its interval
    assert limiter.admit("k3") is None
    assert limiter.admit("k1") == (0, 0.0)  # forgotten: written at once, as a new key
    for n in range(1000):  # bounded whatever the keys
        limiter.admit(f"flood{n}")
    assert len(limiter) == 3


class Lines(logging.Handler):
    """Collects the records of one logger (no propagation games: attached to that logger)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def __enter__(self) -> Lines:
        self.logger.addHandler(self)
        self._level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc_info) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


def test_fault_log_line_names_everything_and_the_next_one_counts_the_held_back():
    clock = ManualClock()
    faults = FaultLog("api", clock)
    error = ConnectFailure("connect failed", cause="connection refused")
    with Lines("fender.upstream") as lines:
        for n in range(42):
            faults.report("10.0.0.7:8080", "orders", error, b"rid%d" % n)
        clock.advance(12.5)
        faults.report("10.0.0.7:8080", "orders", error, b"rid-last")
    assert [r.levelno for r in lines.records] == [logging.WARNING, logging.WARNING]
    first, second = lines.messages()
    assert first == (
        "upstream fault connect_failure: connection refused "
        "(upstream=api replica=10.0.0.7:8080 route=orders rid=rid0)"
    )
    assert second.endswith(
        "(upstream=api replica=10.0.0.7:8080 route=orders rid=rid-last) and 41 more since 12.5s ago"
    )
    assert lines.records[1].held_back == 41


# --------------------------------------------------------------------------- the OS's words


def test_os_words_say_what_the_system_said():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: a connect is refused
        with pytest.raises(OSError) as refused, socket.create_connection(("127.0.0.1", dead), timeout=2):
            pass
    assert os_words(refused.value) == "connection refused"
    # A real getaddrinfo failure, without asking any DNS server: a name where only a number may be.
    with pytest.raises(socket.gaierror) as unresolved:
        socket.getaddrinfo("no-such-name", 80, flags=socket.AI_NUMERICHOST)
    assert os_words(unresolved.value) == "name does not resolve"
    assert os_words(None) == "closed by the upstream"
    # asyncio's one OSError for a name with several addresses that all failed
    joined = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 9), [Errno 111] Connect ..."
    )
    assert os_words(joined) == "connection refused"


# --------------------------------------------------------------------------- faults end to end

ROUTES = """
- name: orders
  upstream: echo
  timeout: 300ms
"""

BIG_HEAD = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (70 * 1024) + b"\r\ncontent-length: 0\r\n\r\n"
ENDLESS_HEAD = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (70 * 1024)  # no line end: counted as raw bytes


@pytest.mark.parametrize(
    ("handler", "status", "reason", "words"),
    [
        (None, 502, "connect_failure", "connection refused"),
        (reset, 502, "reset", "connection reset by peer"),
        (raw(BIG_HEAD), 502, "bad_response", "response head over 64 KiB"),
        (raw(ENDLESS_HEAD), 502, "bad_response", "response head over 64 KiB"),
        (hang, 504, "timeout", "no response head within head_timeout"),
    ],
    ids=["refused", "reset", "head-too-large", "head-never-ends", "timeout"],
)
async def test_each_upstream_fault_is_one_warning_naming_upstream_replica_route_reason_and_os_words(
    start_fender, handler, status, reason, words
):
    async def run(port: int) -> None:
        fender = await start_fender(policy_text(port, routes=ROUTES))
        with Lines("fender.upstream") as lines:
            async with httpx.AsyncClient() as client:
                r = await client.get(fender.url + "/x", headers={"x-request-id": "req-17"})
        assert (r.status_code, r.headers["x-fender-error"]) == (status, reason)
        assert len(lines.records) == 1
        record = lines.records[0]
        assert record.levelno == logging.WARNING
        replica = f"127.0.0.1:{port}"
        assert (record.upstream, record.replica, record.route, record.reason, record.cause) == (
            "echo",
            replica,
            "orders",
            reason,
            words,
        )
        assert record.getMessage() == (
            f"upstream fault {reason}: {words} (upstream=echo replica={replica} route=orders rid=req-17)"
        )

    if handler is None:
        await run(free_port())
    else:
        async with RawUpstream(handler) as up:
            await run(up.port)


async def test_a_dead_replica_writes_one_line_per_ten_seconds_then_says_how_many_it_held_back(start_fender):
    clock = ManualClock()
    port = free_port()
    fender = await start_fender(policy_text(port, routes=ROUTES), clock=clock)
    with Lines("fender.upstream") as lines:
        async with httpx.AsyncClient() as client:
            for _ in range(20):
                r = await client.get(fender.url + "/")
                assert r.status_code == 502
            assert len(lines.records) == 1
            clock.advance(9.9)
            await client.get(fender.url + "/")
            assert len(lines.records) == 1
            clock.advance(0.1)
            await client.get(fender.url + "/")
    assert len(lines.records) == 2
    assert lines.messages()[1].endswith(" and 20 more since 10.0s ago")
    assert lines.records[1].held_back == 20
    assert "connection refused" in lines.messages()[1]


async def test_a_successful_request_writes_no_fault_line(start_fender):
    async with RawUpstream(ok(b"fine")) as up:
        fender = await start_fender(policy_text(up.port, routes=ROUTES))
        with Lines("fender.upstream") as lines:
            async with httpx.AsyncClient() as client:
                r = await client.get(fender.url + "/")
    assert r.status_code == 200
    assert lines.records == []


# --------------------------------------------------------------------------- the access log


@pytest.fixture
def access_logger():
    """Leave fender.access as it was (an AccessLog may attach its stderr handler and set a level)."""
    logger = logging.getLogger("fender.access")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handlers, logger.propagate, level = saved
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)


ACCESS_UPSTREAMS = """
flaky:
  replicas: [{{url: http://127.0.0.1:{flaky}}}]
origin:
  replicas: [{{url: http://127.0.0.1:{origin}}}]
dead:
  replicas: [{{url: http://127.0.0.1:{dead}}}]
"""

ACCESS_ROUTES = """
- name: retried
  match: {path_prefix: /retry}
  upstream: flaky
  retry:
    attempts: 3
    backoff: {initial: 1ms, max: 1ms}
    budget: {ratio: 100%, min_per_second: 10}
- name: cached
  match: {path_prefix: /cache}
  upstream: origin
  cache: {}
- name: broken
  match: {path_prefix: /broken}
  upstream: dead
"""


async def test_json_access_log_is_one_object_per_line_saying_what_each_request_did(
    start_fender, access_logger, capsys
):
    cacheable = ok(b"stored", headers=[(b"cache-control", b"max-age=60")])
    async with RawUpstream(sequence(reset, ok(b"second try"))) as flaky, RawUpstream(cacheable) as origin:
        dead = free_port()
        upstreams = ACCESS_UPSTREAMS.format(flaky=flaky.port, origin=origin.port, dead=dead)
        server = "access_log: true\naccess_log_format: json\n"
        text = policy_text(origin.port, routes=ACCESS_ROUTES, upstreams=upstreams, server=server)
        fender = await start_fender(text)
        capsys.readouterr()  # only what the requests below write
        async with httpx.AsyncClient(base_url=fender.url) as client:
            retried = await client.get("/retry?a=1", headers={"x-request-id": "r-retry"})
            miss = await client.get("/cache/item", headers={"x-request-id": "r-miss"})
            hit = await client.get("/cache/item", headers={"x-request-id": "r-hit"})
            broken = await client.post("/broken", content=b"x", headers={"x-request-id": "r-broken"})
    assert (retried.status_code, retried.text) == (200, "second try")
    assert (miss.status_code, hit.status_code, broken.status_code) == (200, 200, 502)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line a bare JSON object: no log prefix
    assert [r["request_id"] for r in records] == ["r-retry", "r-miss", "r-hit", "r-broken"]
    fields = {
        "time",
        "client",
        "method",
        "target",
        "status",
        "route",
        "upstream",
        "replica",
        "tries",
        "cache",
        "error",
        "request_id",
        "duration_ms",
    }
    assert all(set(r) == fields for r in records)
    by_id = {r["request_id"]: r for r in records}
    r = by_id["r-retry"]
    assert (r["method"], r["target"], r["status"], r["route"], r["upstream"]) == (
        "GET",
        "/retry?a=1",
        200,
        "retried",
        "flaky",
    )
    assert (r["replica"], r["tries"], r["cache"], r["error"]) == (f"127.0.0.1:{flaky.port}", 2, None, None)
    assert r["client"] == "127.0.0.1" and r["time"].endswith("Z") and r["duration_ms"] >= 0
    r = by_id["r-miss"]
    assert (r["route"], r["tries"], r["cache"], r["replica"]) == (
        "cached",
        1,
        "miss",
        f"127.0.0.1:{origin.port}",
    )
    r = by_id["r-hit"]
    assert (r["route"], r["tries"], r["cache"], r["replica"], r["upstream"]) == (
        "cached",
        0,
        "hit",
        None,
        None,
    )
    r = by_id["r-broken"]
    assert (r["method"], r["status"], r["error"], r["tries"], r["replica"]) == (
        "POST",
        502,
        "connect_failure",
        1,
        f"127.0.0.1:{dead}",
    )
    assert len(flaky.requests) == 2 and len(origin.requests) == 1


async def test_text_access_log_line_carries_error_replica_tries_and_cache(start_fender, access_logger):
    dead = free_port()
    fender = await start_fender(policy_text(dead, routes=ROUTES, server="access_log: true\n"))
    with Lines("fender.access") as lines:
        async with httpx.AsyncClient() as client:
            r = await client.get(fender.url + "/p?q=1", headers={"x-request-id": "t-1"})
    assert r.status_code == 502
    [line] = lines.messages()
    expected = (
        f'127.0.0.1 "GET /p?q=1" 502 route=orders upstream=echo replica=127.0.0.1:{dead} tries=1 cache=- '
        "error=connect_failure rid=t-1 "
    )
    assert line.startswith(expected) and re.fullmatch(r"\d+\.\dms", line[len(expected) :]), line
    # Text lines go through the process's log format (propagated), not a bare handler of their own.
    assert access_logger.propagate and not any(isinstance(h, _BareLines) for h in access_logger.handlers)


async def test_access_log_off_by_default_writes_nothing_and_costs_no_object(start_fender, access_logger):
    async with RawUpstream(ok(b"fine")) as up:
        fender = await start_fender(policy_text(up.port))
        with Lines("fender.access") as lines:
            async with httpx.AsyncClient() as client:
                assert (await client.get(fender.url + "/")).status_code == 200
    assert fender.runtime.access_log is None
    assert lines.records == []


@pytest.mark.parametrize(
    ("value", "result"),
    [
        (b"fender; hit; ttl=30", "hit"),
        (b"fender; hit; ttl=-5", "stale"),
        (b"fender; hit; detail=coalesced", "coalesced"),
        (b"fender; hit; detail=coalesced-fleet", "coalesced"),
        (b"fender; fwd=miss; fwd-status=200; stored", "miss"),
        (b"fender; fwd=vary-miss; fwd-status=200", "miss"),
        (b"fender; fwd=stale; fwd-status=304", "revalidated"),
        (b"fender; fwd=stale; fwd-status=502; detail=stale-if-error", "stale"),
        (b"fender; fwd=stale; fwd-status=200; stored", "miss"),
        (b"fender; fwd=request; fwd-status=200", "miss"),
        (b"fender; fwd=miss; detail=only-if-cached", "only_if_cached"),
        (b"fender; fwd=bypass", "bypass"),
    ],
)
def test_cache_status_becomes_the_cache_metric_result_word(value, result):
    assert cache_result([(b"ratelimit", b"x"), (b"cache-status", value)]) == result


def test_no_cache_status_is_no_cache_result():
    assert cache_result([(b"retry-after", b"1")]) is None


def test_a_wrong_access_log_format_is_refused_at_its_line_and_column():
    text = policy_text(free_port(), server="access_log: true\naccess_log_format: jsn\n")
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "access_log_format" in t)
    with pytest.raises(PolicyError) as refused:
        parse_policy(text, "p.yaml")
    column = text.splitlines()[line - 1].index("jsn") + 1
    assert str(refused.value).startswith(
        f"p.yaml:{line}:{column}: server.access_log_format: expected 'text' or 'json', got \"jsn\""
    )


def test_json_lines_get_a_bare_handler_that_a_reload_back_to_text_removes(access_logger):
    AccessLog("json")
    AccessLog("json")  # a reload with the same format: still one handler
    assert [type(h) for h in access_logger.handlers] == [_BareLines] and not access_logger.propagate
    AccessLog("text")
    assert access_logger.handlers == [] and access_logger.propagate
    # Whoever embeds Fender and gave fender.access a handler keeps it, with propagation as it was.
    own = logging.NullHandler()
    access_logger.addHandler(own)
    AccessLog("json")
    assert access_logger.handlers == [own] and access_logger.propagate


async def test_a_reload_that_rebuilds_the_upstream_keeps_a_muted_replica_muted(tmp_path):
    clock = ManualClock()
    port = free_port()
    path = tmp_path / "policy.yaml"

    def write(max_connections: int) -> None:
        path.write_text(
            policy_text(port, routes=ROUTES).replace(
                f"replicas: [{{url: http://127.0.0.1:{port}}}]",
                f"replicas: [{{url: http://127.0.0.1:{port}}}]\n    pool: {{max_connections: {max_connections}}}",
            )
            + "reload: {watch: false}\n"
        )

    write(100)
    fender = Fender(load_policy(path), str(path), clock=clock)
    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
    try:
        url = f"http://127.0.0.1:{fender.data_port}/"
        with Lines("fender.upstream") as lines:
            async with httpx.AsyncClient() as client:
                await client.get(url)
                before = fender.runtime.upstreams["echo"]
                write(50)  # a pool setting changed: the upstream is built anew
                reload = await client.post(f"http://127.0.0.1:{fender.admin_port}/admin/reload")
                assert reload.json()["result"] == "applied"
                assert fender.runtime.upstreams["echo"] is not before
                await client.get(url)
                assert len(lines.records) == 1  # still inside the 10 s of the first line
                clock.advance(10)
                await client.get(url)
        assert lines.messages()[1].endswith(" and 1 more since 10.0s ago")
    finally:
        await fender.stop()


async def test_a_fault_after_the_response_head_is_logged_too(start_fender):
    """reset_mid_body: the client's response is cut, and the error log says why."""

    async def dies_mid_body(req, conn) -> None:
        await conn.send_head(200, [(b"content-length", b"100")])
        conn.write(b"partial")
        await conn.drain()
        conn.reset()

    async with RawUpstream(dies_mid_body) as up:
        fender = await start_fender(policy_text(up.port, routes=ROUTES))
        with Lines("fender.upstream") as lines:
            async with httpx.AsyncClient() as client:
                with pytest.raises(httpx.HTTPError):
                    await client.get(fender.url + "/x", headers={"x-request-id": "req-mid"})
            await wait_until(lambda: len(lines.records) == 1, what="one fault line")
    record = lines.records[0]
    assert (record.upstream, record.route, record.reason) == ("echo", "orders", "reset_mid_body")
    assert "rid=req-mid" in record.getMessage()
