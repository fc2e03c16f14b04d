"""Fender's own HTTP/1.1 server protocol (proxy/server/protocol.py): framing of what it writes,
and what a proxied request or connection leaves behind for the garbage collector.
Real sockets; the framing and limit suites (test_hardening_*.py) cover the refusals."""

from __future__ import annotations

import asyncio
import gc
import socket

from proxy.server.protocol import _Exchange
from tests.conftest import policy_text
from tests.support import procs
from tests.support.raw_client import RawClient, exchange
from tests.support.raw_upstream import RawUpstream, echo, ok

checked_fender = procs.checked_fender

H = b"Host: svc\r\n"


async def test_proxied_requests_leave_no_reference_cycles(checked_fender):
    # A reference cycle per request (an upstream response and its parser once made one)
    # wakes the garbage collector every few thousand requests, to walk every young object.
    async with RawUpstream(ok(b"x" * 100)) as up:
        fender = await checked_fender(policy_text(up.port))
        async with RawClient(fender.data_port) as client:
            for _ in range(20):  # warm up: pools, lazily built objects
                await client.send(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
                assert (await client.response(learn_close=False)).status == 200
            gc.collect()
            gc.disable()
            try:
                for _ in range(200):
                    await client.send(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
                    assert (await client.response(learn_close=False)).status == 200
                found = gc.collect()
            finally:
                gc.enable()
    # Test machinery allocates a little garbage too; 200 requests at one cycle each would be thousands.
    assert found < 100, found


async def test_pipelined_small_responses_are_framed_by_content_length(checked_fender):
    async with RawUpstream(ok(b"hello")) as up:
        fender = await checked_fender(policy_text(up.port))
        async with RawClient(fender.data_port) as client:
            await client.send(b"GET /a HTTP/1.1\r\n" + H + b"\r\n" + b"GET /b HTTP/1.1\r\n" + H + b"\r\n")
            first, second = await client.response(), await client.response()
        assert (first.status, first.body, first.headers[b"content-length"]) == (200, b"hello", b"5")
        assert (second.status, second.body) == (200, b"hello")
        assert not second.closed


class _RecordingConnection:
    """The parts of FenderHttpProtocol an _Exchange writes through, recording each write.

    How many write() calls a response takes cannot be seen from a socket's other end
    (TCP may merge or split them), so this one property is checked against a stand-in.
    """

    def __init__(self, loop) -> None:
        self.loop = loop
        self.write_paused = False
        self.writes: list[bytes] = []
        self.transport = self
        self.completed = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def response_complete(self, exchange) -> None:
        self.completed += 1


def _exchange_on(conn) -> _Exchange:
    return _Exchange(conn, {"method": "GET", "http_version": "1.1"}, keep_alive=True, expect_continue=False)


async def test_a_start_message_carrying_the_body_leaves_in_one_write():
    # The fender.response.body extension: head and a whole small body in one write() call.
    conn = _RecordingConnection(asyncio.get_running_loop())
    exchange = _exchange_on(conn)
    headers = [(b"content-length", b"5")]
    await exchange.send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": headers,
            "body": b"hello",
            "more_body": False,
        }
    )
    await asyncio.sleep(0)  # a scheduled head flush would run here
    assert conn.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
    assert conn.completed == 1

    # The standard two messages: the body joins the head still waiting to be flushed.
    conn = _RecordingConnection(asyncio.get_running_loop())
    exchange = _exchange_on(conn)
    await exchange.send({"type": "http.response.start", "status": 200, "headers": headers})
    await exchange.send({"type": "http.response.body", "body": b"hello", "more_body": False})
    await asyncio.sleep(0)
    assert conn.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]


async def test_unframed_upstream_body_reaches_an_http10_client_delimited_by_close(checked_fender):
    async def chunked(req, conn):
        await conn.send(200, body=b"streamed body", chunked=True)

    async with RawUpstream(chunked) as up:
        fender = await checked_fender(policy_text(up.port))
        response = await exchange(fender.data_port, b"GET /a HTTP/1.0\r\n\r\n")
        assert response.status == 200
        assert response.body == b"streamed body"
        # HTTP/1.0 has no chunked coding: the body ends where the connection does.
        assert b"transfer-encoding" not in response.headers
        assert response.closed
        async with RawClient(fender.data_port) as client:
            await client.send(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
            response = await client.response()
        assert response.headers[b"transfer-encoding"] == b"chunked"
        assert response.body == b"streamed body" and not response.closed


def _one_request_per_connection(port: int, count: int) -> list[int]:
    """Blocking client (run in a thread, so it makes no asyncio objects of its own here)."""
    statuses = []
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):  # bounded: Fender closes after the answer
                data += chunk
            statuses.append(int(data.split(b" ", 2)[1]))
    return statuses


async def test_closed_client_connections_leave_no_reference_cycles(checked_fender):
    # With no cycle per request the collector seldom runs, so a cycle per connection would
    # let closed connections pile up in memory until it did. (The test's own event loop may
    # be asyncio's, whose socket transports do form cycles: only Fender's objects count.)
    async with RawUpstream(ok(b"x" * 100)) as up:
        fender = await checked_fender(policy_text(up.port))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, _one_request_per_connection, fender.data_port, 5) == [200] * 5
        gc.collect()
        gc.disable()
        try:
            statuses = await loop.run_in_executor(None, _one_request_per_connection, fender.data_port, 100)
            await procs.wait_until(lambda: len(fender._servers[0].server_state.connections) == 0)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            fenders_own = [
                type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("proxy.")
            ]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert statuses == [200] * 100
    assert fenders_own == []


async def test_expect_100_continue_is_answered_before_the_body_is_read(checked_fender):
    async with RawUpstream(echo) as up:
        fender = await checked_fender(policy_text(up.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        try:
            writer.write(b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            assert up.requests == []  # nothing went upstream before the client sent its body
            writer.write(b"hello")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"content-length: 5" in head.lower()
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        finally:
            writer.close()
        assert [r.body for r in up.requests] == [b"hello"]


async def test_head_request_gets_the_head_without_a_body_and_the_connection_stays_usable(checked_fender):
    async with RawUpstream(ok(b"twelve bytes")) as up:
        fender = await checked_fender(policy_text(up.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        try:
            writer.write(b"HEAD /a HTTP/1.1\r\n" + H + b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
            # No body after the HEAD answer: the next bytes are the GET's status line.
            get = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = await asyncio.wait_for(reader.readexactly(12), 5)
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 12" in head.lower()
        assert get.startswith(b"HTTP/1.1 200 ") and body == b"twelve bytes"
