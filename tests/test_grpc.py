"""gRPC end to end: grpcio client -> Fender (h2c listener) -> grpcio server (protocol: h2 upstream).

Real peers only: grpcio's server with generic handlers and bytes serializers (tests/support/grpc_peers.py)
and grpcio's client in a worker thread; an HTTP/1.1 client where the test is about Fender's own rules.
"""

from __future__ import annotations

import asyncio
import textwrap

import httpx
import pytest

from proxy.kernel.classify import Classifier
from proxy.policies.cache.request import request_of
from tests.support.grpc_peers import EchoService, GrpcReplica, channel, frame, grpc, method, unframe
from tests.support.procs import wait_until


@pytest.fixture
def replicas():
    started: list[GrpcReplica] = []

    def start(*args, **kwargs) -> GrpcReplica:
        replica = GrpcReplica(*args, **kwargs)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()


def grpc_policy(*ports: int, upstream: str = "", route: str = "") -> str:
    urls = ", ".join(f"{{url: http://127.0.0.1:{port}}}" for port in ports)
    return (
        textwrap.dedent(
            f"""
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        upstreams:
          svc:
            replicas: [{urls}]
            protocol: h2
        """
        )
        + textwrap.indent(textwrap.dedent(upstream), "    ")
        + "routes:\n  - name: grpc\n    upstream: svc\n"
        + (textwrap.indent(textwrap.dedent(route), "    "))
    )


def call(port: int, name: str, request, kind: str = "unary_unary", timeout: float = 10, metadata=None):
    """One call through grpcio's client (blocking: run it in a thread)."""
    with channel(port) as chan:
        stub = method(chan, name, kind)
        result = stub(request, timeout=timeout, metadata=metadata)
        if kind in ("unary_stream", "stream_stream"):
            return list(result)
        return result


def outcome(port: int, name: str, request, **kw):
    """(status code, details or reply) of a unary call."""
    try:
        return grpc.StatusCode.OK, call(port, name, request, **kw)
    except grpc.RpcError as error:
        return error.code(), error.details()


async def in_thread(fn, *args, **kw):
    return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kw), 30)


# --------------------------------------------------------------------------- the four kinds of call


async def test_unary_and_streaming_calls_through_fender(replicas, start_fender):
    replica = replicas()
    fender = await start_fender(grpc_policy(replica.port))
    port = fender.data_port
    assert await in_thread(call, port, "Unary", b"hello") == b"a:hello"
    assert await in_thread(call, port, "ServerStream", b"3", "unary_stream") == [b"a:0", b"a:1", b"a:2"]
    sent = iter([b"x", b"y", b"z"])
    assert await in_thread(call, port, "ClientStream", sent, "stream_unary") == b"a:x+y+z"
    echoed = await in_thread(call, port, "Bidi", iter([b"1", b"2"]), "stream_stream")
    assert echoed == [b"a:1", b"a:2"]
    # Each call went once, over one multiplexed connection to the replica.
    assert replica.service.calls == 4
    pool = fender.runtime.upstreams["svc"].replicas[0].pool
    assert pool.connections_opened == 1


async def test_bidi_replies_flow_before_the_client_half_closes(replicas, start_fender):
    """Full duplex: each reply comes back while the client still holds its stream open."""
    replica = replicas()
    fender = await start_fender(grpc_policy(replica.port))
    replies: list[bytes] = []

    def chat() -> None:
        import queue

        outbox: queue.Queue = queue.Queue()

        def requests():
            for _ in range(3):
                item = outbox.get(timeout=10)
                if item is None:
                    return
                yield item

        with channel(fender.data_port) as chan:
            stream = method(chan, "Bidi", "stream_stream")(requests(), timeout=10)
            for n in range(3):
                outbox.put(b"m%d" % n)
                replies.append(next(stream))  # the reply to m<n> arrives before m<n+1> is sent
            outbox.put(None)

    await in_thread(chat)
    assert replies == [b"a:m0", b"a:m1", b"a:m2"]


async def test_http1_client_to_grpc_replica_gets_trailers(replicas, start_fender):
    """Translation one way: an HTTP/1.1 client reaches an HTTP/2 replica; gRPC trailers come back chunked."""
    from tests.conftest import raw_request

    replica = replicas()
    fender = await start_fender(grpc_policy(replica.port))
    body = frame(b"over http1")
    raw = await raw_request(
        fender.data_port,
        b"POST /test.Echo/Unary HTTP/1.1\r\nHost: svc\r\ncontent-type: application/grpc\r\n"
        b"te: trailers\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body),
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    assert frame(b"a:over http1") in rest
    assert rest.endswith(b"0\r\ngrpc-status: 0\r\ngrpc-message: \r\n\r\n")


# --------------------------------------------------------------------------- retries and breakers


async def test_unavailable_is_retried_on_another_replica(replicas, start_fender):
    failing = replicas(EchoService("bad", fail_first=100))
    healthy = replicas(EchoService("good"))
    fender = await start_fender(
        grpc_policy(
            failing.port,
            healthy.port,
            route="""
            retry:
              attempts: 2
              retry_on: [unavailable]
              backoff: {initial: 1ms, max: 2ms}
            """,
        )
    )
    answers = [await in_thread(outcome, fender.data_port, "Unary", b"q") for _ in range(4)]
    # Every try that reached the failing replica was retried on the other one.
    assert answers == [(grpc.StatusCode.OK, b"good:q")] * 4
    assert failing.service.calls >= 1
    assert healthy.service.calls == 4


async def test_a_status_not_listed_is_not_retried(replicas, start_fender):
    replica = replicas(EchoService("only", fail_first=1, fail_code="INTERNAL"))
    fender = await start_fender(
        grpc_policy(
            replica.port, route="retry: {attempts: 3, retry_on: [unavailable], backoff: {initial: 1ms}}"
        )
    )
    code, _ = await in_thread(outcome, fender.data_port, "Unary", b"q")
    assert code == grpc.StatusCode.INTERNAL
    assert replica.service.calls == 1


async def test_a_client_stream_is_not_retried(replicas, start_fender):
    """Two messages went to the replica: never sent again, even with unavailable in retry_on."""
    replica = replicas(EchoService("x"))

    def abort_stream(requests, context):
        list(requests)
        replica.service.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "no")

    replica.service.client_stream = abort_stream
    replica.stop()
    replica = replicas(replica.service)
    fender = await start_fender(
        grpc_policy(
            replica.port, route="retry: {attempts: 3, retry_on: [unavailable], backoff: {initial: 1ms}}"
        )
    )

    def stream():
        return outcome(fender.data_port, "ClientStream", iter([b"a", b"b"]), kind="stream_unary")

    code, _ = await in_thread(stream)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert replica.service.calls == 1


async def test_breaker_opens_on_unavailable_and_answers_unavailable_at_once(replicas, start_fender):
    replica = replicas(EchoService("down", fail_first=1000))
    fender = await start_fender(
        grpc_policy(
            replica.port,
            route="circuit_breaker: {failure_on: [unavailable], consecutive_failures: 3, open_for: 30s}",
        )
    )
    codes = [(await in_thread(outcome, fender.data_port, "Unary", b"q"))[0] for _ in range(5)]
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 5
    assert replica.service.calls == 3  # the last two never left Fender
    async with httpx.AsyncClient() as admin:
        breakers = (await admin.get(f"{fender.admin_url}/admin/breakers")).json()["breakers"]
    assert [b["state"] for b in breakers] == ["open"]


def test_the_outcome_is_read_from_a_trailers_only_head():
    classify = Classifier(("503", "unavailable", "internal", "reset"))
    assert classify.grpc == {14: "unavailable", 13: "internal"}
    assert classify.statuses == frozenset({503}) and classify.reasons == frozenset({"reset"})
    only = [(b"content-type", b"application/grpc"), (b"grpc-status", b"14"), (b"grpc-message", b"down")]
    assert classify.grpc_fails(only) == "unavailable"
    assert classify.grpc_fails([(b"content-type", b"application/grpc")]) is None  # messages follow
    assert classify.grpc_fails([(b"grpc-status", b"5")]) is None  # not_found is not listed
    assert Classifier(("5xx",)).grpc_fails(only) is None


# --------------------------------------------------------------------------- deadlines


async def test_grpc_timeout_is_enforced_and_the_time_left_goes_upstream(replicas, start_fender):
    replica = replicas()
    fender = await start_fender(grpc_policy(replica.port, route="timeout: 30s"))
    code, _ = await in_thread(outcome, fender.data_port, "Unary", b"sleep:3000", timeout=0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # grpcio turns the grpc-timeout Fender sent into the call's deadline.
    assert replica.service.time_remaining is not None
    assert 0 < replica.service.time_remaining <= 0.5


async def test_grpc_timeout_never_lengthens_the_route_timeout(replicas, start_fender):
    replica = replicas()
    fender = await start_fender(grpc_policy(replica.port, route="timeout: 300ms"))
    body = frame(b"sleep:3000")
    async with httpx.AsyncClient(base_url=fender.url) as client:
        r = await client.post(
            "/test.Echo/Unary",
            content=body,
            headers={"content-type": "application/grpc", "te": "trailers", "grpc-timeout": "20S"},
        )
    assert r.headers["grpc-status"] == "4"  # DEADLINE_EXCEEDED
    # Either Fender's route timeout answers, or (a loaded machine delaying Fender's timer) the
    # replica enforces the 300 ms Fender sent it first: both show the 20 s was never granted.
    assert r.headers.get("x-fender-error", "timeout") == "timeout"
    assert replica.service.time_remaining is not None
    assert 0 < replica.service.time_remaining <= 0.3


# --------------------------------------------------------------------------- faults


async def test_a_replica_killed_mid_stream_fails_that_call_only(replicas, start_fender):
    doomed = replicas(EchoService("doomed"))
    other = replicas(EchoService("other"))
    text = textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        upstreams:
          doomed: {{replicas: [{{url: http://127.0.0.1:{doomed.port}}}], protocol: h2}}
          other: {{replicas: [{{url: http://127.0.0.1:{other.port}}}], protocol: h2}}
        routes:
          - {{name: streams, upstream: doomed, match: {{path: /test.Echo/ServerStream}}}}
          - {{name: rest, upstream: other}}
        """
    )
    fender = await start_fender(text)
    got: list[bytes] = []
    failure: list = []

    def held_stream() -> None:
        with channel(fender.data_port) as chan:
            stream = method(chan, "ServerStream", "unary_stream")(b"hold:2", timeout=20)
            try:
                for message in stream:
                    got.append(message)
            except grpc.RpcError as error:
                failure.append(error.code())

    with channel(fender.data_port) as chan:  # one client connection carries both calls
        unary = method(chan, "Unary")
        streaming = asyncio.ensure_future(asyncio.to_thread(held_stream))
        await wait_until(lambda: len(got) == 2, within=10)
        assert await in_thread(unary, b"before", timeout=10) == b"other:before"
        doomed.server.stop(0)
        await asyncio.wait_for(streaming, 20)
        assert got == [b"doomed:0", b"doomed:1"]
        assert failure and failure[0] != grpc.StatusCode.OK
        # Other calls and connections are unaffected.
        assert await in_thread(unary, b"after", timeout=10) == b"other:after"
    assert other.service.calls == 2


async def test_goaway_from_the_replica_lets_calls_in_flight_finish(replicas, start_fender):
    replica = replicas()
    fender = await start_fender(grpc_policy(replica.port))
    port = fender.data_port
    assert await in_thread(call, port, "Unary", b"1") == b"a:1"
    pool = fender.runtime.upstreams["svc"].replicas[0].pool
    # A graceful stop sends GOAWAY; the call in flight finishes within the grace.
    slow = asyncio.ensure_future(in_thread(call, port, "Unary", b"sleep:300"))
    await wait_until(lambda: replica.service.calls == 2, within=10)
    replica.server.stop(5)
    assert await slow == b"a:sleep:300"
    await wait_until(lambda: pool.goaways >= 1, within=10)
    assert pool.connections_opened == 1
    await wait_until(lambda: pool.idle + pool.in_use == 0, within=10)  # the connection left the pool


# --------------------------------------------------------------------------- health and cache


async def test_grpc_health_checks_take_a_not_serving_replica_out(replicas, start_fender):
    sick = replicas(EchoService("sick"), health="NOT_SERVING")
    well = replicas(EchoService("well"))
    fender = await start_fender(
        grpc_policy(
            sick.port,
            well.port,
            upstream="""
            health_check: {grpc: true, interval: 50ms, timeout: 50ms, unhealthy_threshold: 1, healthy_threshold: 1}
            """,
        )
    )
    picker = fender.runtime.upstreams["svc"].picker
    await wait_until(lambda: [s.active_healthy for s in picker.states] == [False, True], within=10)
    answers = {await in_thread(call, fender.data_port, "Unary", b"h") for _ in range(4)}
    assert answers == {b"well:h"}
    sick.set_health("", "SERVING")
    await wait_until(lambda: all(s.active_healthy for s in picker.states), within=10)


def test_the_cache_never_serves_a_grpc_call():
    assert request_of([(b"content-type", b"application/grpc+proto")]).origin_only is True
    assert request_of([(b"content-type", b"application/json")]).origin_only is False


def test_grpc_names_in_retry_on_and_failure_on():
    from pydantic import ValidationError

    from proxy.policies.breaker.options import BreakerOptions
    from proxy.policies.retry.options import RetryOptions

    assert RetryOptions(retry_on=["unavailable", "resource_exhausted", 503]).retry_on == (
        "unavailable",
        "resource_exhausted",
        "503",
    )
    assert BreakerOptions(failure_on=["unavailable", "deadline_exceeded"]).failure_on == (
        "unavailable",
        "deadline_exceeded",
    )
    with pytest.raises(ValidationError, match="gRPC status"):
        RetryOptions(retry_on=["unavaliable"])
    # The wire form: messages of a gRPC body.
    assert unframe(frame(b"a") + frame(b"bc")) == [b"a", b"bc"]
