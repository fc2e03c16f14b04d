"""Bulkheads: the queue with a manual clock, and isolation, 503s and disconnects over real sockets."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from proxy.clock import ManualClock
from proxy.policies.bulkhead.bulkhead import Bulkhead, ClientLeft, Rejected, SlotReply
from tests.conftest import policy_text, raw_request
from tests.support.raw_upstream import RawUpstream, hang, ok


async def settle() -> None:
    """Let every ready task run (a bounded number of loop turns, no wall-clock wait)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def eventually(predicate, within: float = 5.0) -> None:
    """Wait (bounded in time and turns) until the proxy's state satisfies ``predicate``.

    The bulkhead queue has no notification hook for tests; its state changes
    within a few loop turns of the socket event that causes it.
    """
    async with asyncio.timeout(within):
        for _ in range(100_000):
            if predicate():
                return
            await asyncio.sleep(0.002)
    raise AssertionError("condition not reached")


async def test_queue_is_fifo_and_slots_pass_in_order():
    bulkhead = Bulkhead(1, 3, 10.0, ManualClock())
    assert bulkhead.try_acquire()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await bulkhead.acquire()
        order.append(name)

    tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
    await settle()
    assert bulkhead.queued == 3 and bulkhead.in_flight == 1
    for expected in ("a", "b", "c"):
        bulkhead.release()
        await settle()
        assert order[-1] == expected
        assert bulkhead.in_flight == 1  # the slot moved to the waiter
    await asyncio.gather(*tasks)
    bulkhead.release()
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0


async def test_full_queue_rejects_at_once():
    bulkhead = Bulkhead(1, 1, 10.0, ManualClock())
    assert bulkhead.try_acquire()
    queued = asyncio.create_task(bulkhead.acquire())
    await settle()
    with pytest.raises(Rejected) as info:
        await bulkhead.acquire()
    assert info.value.reason == "bulkhead_full"
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)


async def test_queue_timeout_with_manual_clock():
    clock = ManualClock()
    bulkhead = Bulkhead(1, 5, 0.2, clock)
    assert bulkhead.try_acquire()
    waiter = asyncio.create_task(bulkhead.acquire())
    await settle()
    clock.advance(0.19)
    await settle()
    assert not waiter.done()
    clock.advance(0.02)
    await settle()
    with pytest.raises(Rejected) as info:
        await waiter
    assert info.value.reason == "bulkhead_timeout"
    assert bulkhead.queued == 0 and bulkhead.in_flight == 1
    bulkhead.release()
    assert bulkhead.in_flight == 0


async def test_cancelled_waiter_frees_its_place_and_never_takes_a_slot():
    clock = ManualClock()
    bulkhead = Bulkhead(1, 2, 10.0, clock)
    assert bulkhead.try_acquire()
    first = asyncio.create_task(bulkhead.acquire())
    second = asyncio.create_task(bulkhead.acquire())
    await settle()
    assert bulkhead.queued == 2
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert first.cancelled()
    assert bulkhead.queued == 1  # its place is free: another request can queue
    third = asyncio.create_task(bulkhead.acquire())
    await settle()
    assert bulkhead.queued == 2
    bulkhead.release()  # goes to `second`, not to the cancelled `first`
    await settle()
    assert second.done() and not third.done()
    bulkhead.release()
    await settle()
    assert third.done()
    bulkhead.release()
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0
    assert clock.sleepers == 0  # no timer left behind


async def test_slot_handed_over_at_the_moment_of_cancellation_is_passed_on():
    bulkhead = Bulkhead(1, 2, 10.0, ManualClock())
    assert bulkhead.try_acquire()
    first = asyncio.create_task(bulkhead.acquire())
    second = asyncio.create_task(bulkhead.acquire())
    await settle()
    bulkhead.release()  # the slot is handed to `first`...
    first.cancel()  # ...which is cancelled before it could run
    await asyncio.gather(first, return_exceptions=True)
    await settle()
    assert first.cancelled()
    assert second.done()  # the slot went on to the next waiter
    assert bulkhead.in_flight == 1
    bulkhead.release()
    assert bulkhead.in_flight == 0


async def test_disconnect_while_queued_leaves_the_queue():
    bulkhead = Bulkhead(1, 2, 10.0, ManualClock())
    assert bulkhead.try_acquire()
    gone = asyncio.Event()
    waiter = asyncio.create_task(bulkhead.acquire(disconnect=gone.wait))
    await settle()
    assert bulkhead.queued == 1
    gone.set()
    with pytest.raises(ClientLeft):
        await waiter
    assert bulkhead.queued == 0
    bulkhead.release()
    assert bulkhead.in_flight == 0


class FakeBody:
    """A minimal Reply for the SlotReply unit test (the real ones are covered over sockets below)."""

    status = 200
    headers: list = []

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def has_body(self) -> bool:
        return True

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def close(self) -> None:
        self.closed = True


async def test_slot_reply_releases_once_at_end_of_body_or_close():
    bulkhead = Bulkhead(2, 0, 1.0, ManualClock())
    assert bulkhead.try_acquire() and bulkhead.try_acquire()
    read_to_end = SlotReply(FakeBody([b"a", b"b"]), bulkhead)
    assert await read_to_end.read() == b"a"
    assert bulkhead.in_flight == 2
    assert await read_to_end.read() == b"b"
    assert await read_to_end.read() == b""
    assert bulkhead.in_flight == 1
    read_to_end.close()  # idempotent
    assert bulkhead.in_flight == 1
    closed = SlotReply(FakeBody([b"a"]), bulkhead)
    closed.close()
    closed.close()
    assert bulkhead.in_flight == 0


# --------------------------------------------------------------------------- real sockets


def bulkhead_policy(port: int, section: str, timeout: str = "30s") -> str:
    return policy_text(
        port,
        routes=f"""
        - name: guarded
          upstream: echo
          timeout: {timeout}
          bulkhead: {section}
        """,
    )


async def test_full_bulkhead_gives_503_with_headers_without_calling_upstream(start_fender):
    async with RawUpstream(hang) as upstream:
        fender = await start_fender(bulkhead_policy(upstream.port, "{max_concurrent: 2, max_queued: 0}"))
        async with httpx.AsyncClient(timeout=30) as client:
            pending = [asyncio.create_task(client.get(fender.url + f"/slow/{i}")) for i in range(2)]
            await upstream.wait_until(lambda: len(upstream.requests) == 2)
            rejected = await client.get(fender.url + "/rejected")
            admin = (await client.get(fender.admin_url + "/admin/bulkheads")).json()
            metrics = (await client.get(fender.admin_url + "/metrics")).text
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    assert rejected.status_code == 503
    assert rejected.headers["x-fender-error"] == "bulkhead_full"
    assert rejected.headers["retry-after"] == "1"
    assert [r.target for r in upstream.requests] == [b"/slow/0", b"/slow/1"]
    assert admin["routes"]["guarded"]["in_flight"] == 2
    assert 'fender_bulkhead_in_flight{route="guarded"} 2.0' in metrics
    assert 'fender_bulkhead_rejected_total{reason="bulkhead_full",route="guarded"} 1.0' in metrics


async def test_queue_timeout_gives_503_bulkhead_timeout(start_fender):
    async with RawUpstream(hang) as upstream:
        fender = await start_fender(
            bulkhead_policy(upstream.port, "{max_concurrent: 1, max_queued: 5, queue_timeout: 50ms}")
        )
        async with httpx.AsyncClient(timeout=30) as client:
            pending = asyncio.create_task(client.get(fender.url + "/held"))
            await upstream.wait_until(lambda: len(upstream.requests) == 1)
            timed_out = await client.get(fender.url + "/queued")
            metrics = (await client.get(fender.admin_url + "/metrics")).text
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    assert timed_out.status_code == 503
    assert timed_out.headers["x-fender-error"] == "bulkhead_timeout"
    assert timed_out.headers["retry-after"] == "1"
    assert [r.target for r in upstream.requests] == [b"/held"]
    assert 'fender_bulkhead_rejected_total{reason="bulkhead_timeout",route="guarded"} 1.0' in metrics
    assert 'fender_bulkhead_queue_wait_seconds_count{route="guarded"} 1.0' in metrics


async def test_client_leaving_the_queue_never_reaches_the_upstream(start_fender):
    release = asyncio.Event()

    async def gated(req, conn):
        if req.target == b"/held":
            await release.wait()
        await conn.send(200, [], b"done")

    async with RawUpstream(gated) as upstream:
        fender = await start_fender(
            bulkhead_policy(upstream.port, "{max_concurrent: 1, max_queued: 1, queue_timeout: 30s}")
        )
        state = fender.runtime.exposed["bulkhead"]["guarded"].bulkhead
        async with httpx.AsyncClient(timeout=30) as client:
            held = asyncio.create_task(client.get(fender.url + "/held"))
            await upstream.wait_until(lambda: len(upstream.requests) == 1)
            # A raw client queues a request, then hangs up.
            reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
            writer.write(b"GET /gone HTTP/1.1\r\nHost: svc\r\n\r\n")
            await writer.drain()
            await eventually(lambda: state.queued == 1)
            writer.close()
            await eventually(lambda: state.queued == 0)
            release.set()
            assert (await held).status_code == 200
            after = await client.get(fender.url + "/after")
            metrics = (await client.get(fender.admin_url + "/metrics")).text
    assert after.status_code == 200
    assert [r.target for r in upstream.requests] == [b"/held", b"/after"]
    assert state.in_flight == 0
    assert 'fender_bulkhead_rejected_total{reason="client_gone",route="guarded"} 1.0' in metrics


async def test_slot_is_held_until_the_response_body_is_done(start_fender):
    finish = asyncio.Event()

    async def streaming(req, conn):
        if req.target == b"/stream":
            await conn.send_head(200, [(b"transfer-encoding", b"chunked")])
            await conn.send_chunk(b"first part")
            await finish.wait()
            await conn.send_chunk(b"second part")
            await conn.end_chunks()
        else:
            await conn.send(200, [], b"ok")

    async with RawUpstream(streaming) as upstream:
        fender = await start_fender(bulkhead_policy(upstream.port, "{max_concurrent: 1, max_queued: 0}"))
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("GET", fender.url + "/stream") as response:
                assert response.status_code == 200
                # The head is through, but the upstream is still busy sending the body.
                busy = await client.get(fender.url + "/other")
                finish.set()
                body = await response.aread()
            free = await client.get(fender.url + "/other")
    assert body == b"first partsecond part"
    assert busy.status_code == 503 and busy.headers["x-fender-error"] == "bulkhead_full"
    assert free.status_code == 200
    assert [r.target for r in upstream.requests] == [b"/stream", b"/other"]


async def test_saturated_route_does_not_hold_up_another_route(echo_upstream, start_fender):
    """Upstream A hangs and route A's bulkhead fills; route B (another upstream) keeps answering."""
    async with RawUpstream(hang) as hung:
        text = policy_text(
            echo_upstream.port,
            upstreams=f"""
            hung:
              replicas: [{{url: http://127.0.0.1:{hung.port}}}]
              pool: {{max_connections: 4}}
            """,
            routes="""
            - name: a
              match: {path_prefix: /a}
              upstream: hung
              timeout: 60s
              bulkhead: {max_concurrent: 4, max_queued: 4, queue_timeout: 60s}
            - name: b
              match: {path_prefix: /b}
              upstream: echo
            """,
        )
        fender = await start_fender(text)
        state = fender.runtime.exposed["bulkhead"]["a"].bulkhead
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            stuck = [asyncio.create_task(client.get(fender.url + f"/a/{i}")) for i in range(8)]
            await hung.wait_until(lambda: len(hung.requests) == 4)
            await eventually(lambda: state.queued == 4)
            overflow = await client.get(fender.url + "/a/overflow")
            # Route B answers, all of it, while every request of route A is still pending.
            async with asyncio.timeout(10):
                served = await asyncio.gather(*(client.get(fender.url + f"/b/{i}") for i in range(20)))
            still_pending = sum(not task.done() for task in stuck)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
    assert overflow.status_code == 503 and overflow.headers["x-fender-error"] == "bulkhead_full"
    assert [r.status_code for r in served] == [200] * 20
    assert sorted(r["path"] for r in echo_upstream.requests) == sorted(f"/b/{i}" for i in range(20))
    assert still_pending == 8
    assert len(hung.requests) == 4  # the queued four never reached the hung upstream


async def test_head_only_and_local_replies_release_at_once(echo_upstream, start_fender):
    fender = await start_fender(bulkhead_policy(echo_upstream.port, "{max_concurrent: 1, max_queued: 0}"))
    state = fender.runtime.exposed["bulkhead"]["guarded"].bulkhead
    async with httpx.AsyncClient() as client:
        statuses = [(await client.head(fender.url + "/")).status_code for _ in range(3)]
        statuses += [(await client.get(fender.url + "/status/204")).status_code for _ in range(3)]
    raw = await raw_request(fender.data_port, b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
    assert statuses == [200, 200, 200, 204, 204, 204]
    assert raw.startswith(b"HTTP/1.1 200")
    assert state.in_flight == 0


async def test_upstream_fault_releases_the_slot(start_fender):
    async with RawUpstream(ok(b"fine")) as upstream:
        port = upstream.port
    # Nothing listens on the port any more: every try is a connect failure (502).
    fender = await start_fender(bulkhead_policy(port, "{max_concurrent: 1, max_queued: 0}"))
    state = fender.runtime.exposed["bulkhead"]["guarded"].bulkhead
    async with httpx.AsyncClient() as client:
        statuses = [(await client.get(fender.url + "/")).status_code for _ in range(3)]
    assert statuses == [502, 502, 502]
    assert state.in_flight == 0
