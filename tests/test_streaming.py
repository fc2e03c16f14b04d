"""Streamed bodies leave Fender piece by piece, as they arrive: never held for the next piece.

No timing: the upstream sends event 1 and then waits on an event the test sets
only after the client has read event 1 through Fender. A Fender that holds a
piece until the next one arrives never delivers event 1, and the bounded read
fails. Run again on granian by tests/test_granian.py.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import policy_text
from tests.support.raw_upstream import RawUpstream, Request, Responder

EVENT_1 = b"data: one\n\n"
EVENT_2 = b"data: two\n\n"
_READ_LIMIT = 5.0  # bound on each read; the pass case takes milliseconds


def _held_stream(framing: str, release: asyncio.Event):
    """An upstream handler: event 1, then event 2 only once the test sets ``release``."""

    async def handler(req: Request, conn: Responder) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        if framing == "chunked":
            await conn.send_head(200, headers + [(b"transfer-encoding", b"chunked")])
            await conn.send_chunk(EVENT_1)
            await release.wait()
            await conn.send_chunk(EVENT_2)
            await conn.end_chunks()
        elif framing == "length":
            length = len(EVENT_1) + len(EVENT_2)
            await conn.send_head(200, headers + [(b"content-length", str(length).encode())])
            conn.write(EVENT_1)
            await release.wait()
            conn.write(EVENT_2)
        else:  # close-delimited: no framing, the close ends the body
            await conn.send_head(200, headers + [(b"connection", b"close")])
            conn.write(EVENT_1)
            await release.wait()
            conn.write(EVENT_2)
            conn.close()

    return handler


async def _read_until(reader: asyncio.StreamReader, needle: bytes, seen: bytes) -> bytes:
    async with asyncio.timeout(_READ_LIMIT):
        while needle not in seen:
            chunk = await reader.read(65536)
            if not chunk:
                raise AssertionError(f"connection closed before {needle!r}; got {seen!r}")
            seen += chunk
    return seen


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
async def test_each_event_reaches_the_client_while_the_upstream_holds_the_next(start_fender, framing):
    release = asyncio.Event()
    async with RawUpstream(_held_stream(framing, release)) as up:
        fender = await start_fender(policy_text(up.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        try:
            writer.write(b"GET /events HTTP/1.1\r\nHost: svc\r\n\r\n")
            # Only the test sets release: reading event 1 here, before it, shows event 1 reached the
            # client while the upstream holds event 2 (a proxy reading one piece ahead times out here).
            seen = await _read_until(reader, EVENT_1, b"")
            assert EVENT_2 not in seen
            assert seen.startswith(b"HTTP/1.1 200 ")
            release.set()
            seen = await _read_until(reader, EVENT_2, seen)
            if framing == "chunked":
                seen = await _read_until(reader, b"0\r\n\r\n", seen)
        finally:
            writer.close()


async def test_request_body_pieces_reach_the_upstream_while_the_client_holds_the_next(start_fender):
    """The request direction: a chunked upload is passed on piece by piece."""
    got_first = asyncio.Event()

    async def handler(req: Request, conn: Responder) -> None:
        received = b""
        while True:
            chunk = await req.read_body()
            if not chunk:
                break
            received += chunk
            if b"part-1" in received:
                got_first.set()
        await conn.send(200, body=received)

    async with RawUpstream(handler, stream_request_body=True) as up:
        fender = await start_fender(policy_text(up.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        try:
            writer.write(
                b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n6\r\npart-1\r\n"
            )
            await writer.drain()
            async with asyncio.timeout(_READ_LIMIT):
                await got_first.wait()  # part 1 is upstream before part 2 was even written
            writer.write(b"6\r\npart-2\r\n0\r\n\r\n")
            await writer.drain()
            seen = await _read_until(reader, b"part-1part-2", b"")
            assert seen.startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()


def _two_piece_cacheable(release: asyncio.Event):
    async def handler(req: Request, conn: Responder) -> None:
        await conn.send_head(200, [(b"transfer-encoding", b"chunked"), (b"cache-control", b"max-age=60")])
        await conn.send_chunk(EVENT_1)
        await release.wait()
        await conn.send_chunk(EVENT_2)
        await conn.end_chunks()

    return handler


async def test_a_streamed_response_is_stored_whole_and_the_slot_held_until_its_end(start_fender):
    """Pieces leave at once, yet the cache stores the whole body and the bulkhead slot is held
    until the upstream body ends (a second request meanwhile finds the bulkhead full)."""
    release = asyncio.Event()
    routes = """
    - name: all
      upstream: echo
      cache: {}
      bulkhead: {max_concurrent: 1, max_queued: 0}
    """
    async with RawUpstream(_two_piece_cacheable(release)) as up:
        fender = await start_fender(policy_text(up.port, routes))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        try:
            writer.write(b"GET /events HTTP/1.1\r\nHost: svc\r\n\r\n")
            seen = await _read_until(reader, EVENT_1, b"")
            assert EVENT_2 not in seen
            # The slot is still held: another request (another URL, so no coalescing) is refused.
            other_reader, other_writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
            try:
                other_writer.write(b"GET /other HTTP/1.1\r\nHost: svc\r\n\r\n")
                refused = await _read_until(other_reader, b"\r\n\r\n", b"")
                assert refused.startswith(b"HTTP/1.1 503 ") and b"x-fender-error: bulkhead_full" in refused
            finally:
                other_writer.close()
            release.set()
            await _read_until(reader, b"0\r\n\r\n", seen)
            # Stored whole: the same URL again is a hit with both events, the upstream not asked.
            writer.write(b"GET /events HTTP/1.1\r\nHost: svc\r\n\r\n")
            hit = await _read_until(reader, EVENT_2, b"")
            assert b"cache-status: fender; hit" in hit.lower()
            assert EVENT_1 in hit
        finally:
            writer.close()
    assert len(up.requests) == 1
