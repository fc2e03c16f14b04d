"""HTTP/2 hardening of the data listener, each case against a raw-frame client (the ``h2`` package,
and hyperframe for frames h2 would not send): Rapid Reset, CONTINUATION flood, HPACK bomb, SETTINGS and
PING floods, zero-window stalls, too many concurrent streams, idle connections, graceful GOAWAY on drain
and on max_requests_per_connection. Every case also checks that another connection is still served."""

from __future__ import annotations

import asyncio

import httpx
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame

from tests.conftest import policy_text
from tests.support.h2_client import H2Client
from tests.support.raw_upstream import RawUpstream, Request, Responder


def _metric(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _metrics(fender) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{fender.admin_url}/metrics")).text


async def _still_served(fender) -> None:
    async with H2Client(fender.data_port) as other:
        response = await other.response(other.request("/other"))
    assert response.status == 200


def _gated():
    """An upstream that holds /hold requests until ``gate`` is set, and answers others at once."""
    gate = asyncio.Event()

    async def handler(req: Request, conn: Responder) -> None:
        if req.target.startswith(b"/hold"):
            await gate.wait()
        if req.target.startswith(b"/big"):
            await conn.send(200, body=b"b" * 200_000)
            return
        await conn.send(200, body=b"ok")

    return gate, handler


async def test_streams_beyond_the_limit_are_refused(start_fender):
    gate, handler = _gated()
    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port, server="http2: {max_concurrent_streams: 2}\n"))
        async with H2Client(fender.data_port) as client:
            held = [client.request("/hold"), client.request("/hold")]
            await up.wait_until(lambda: len(up.requests) == 2)
            extra = client.request("/hold")
            assert (await client.response(extra)).reset == ErrorCodes.REFUSED_STREAM
            gate.set()
            for sid in held:
                assert (await client.response(sid)).status == 200
            # Once they are done, a new stream is served on the same connection.
            assert (await client.response(client.request("/after"))).status == 200
        assert len(up.requests) == 3
        text = await _metrics(fender)
    assert _metric(text, "fender_http2_stream_resets_total", reason="refused") == 1


async def test_rapid_reset_ends_the_connection(start_fender):
    gate, handler = _gated()
    async with RawUpstream(handler) as up:
        server = "http2: {max_concurrent_streams: 10, max_resets_per_second: 20}\n"
        fender = await start_fender(policy_text(up.port, server=server))
        async with H2Client(fender.data_port) as client:
            for _ in range(200):  # open and cancel at once, as CVE-2023-44487
                sid = client.request("/hold")
                client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            client.flush()
            assert await client.wait_closed()
            assert client.goaway is not None
            assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        # The work started stays bounded: streams whose requests still run count against the limit
        # even after the client reset them.
        assert len(up.requests) <= 10
        gate.set()
        await _still_served(fender)
        text = await _metrics(fender)
    assert _metric(text, "fender_http2_goaway_total", reason="rapid_reset") == 1


async def test_continuation_flood_is_capped(start_fender, echo_upstream):
    fender = await start_fender(
        policy_text(echo_upstream.port, server="http2: {max_header_list_size: 4KiB}\n")
    )
    async with H2Client(fender.data_port) as client:
        await client.until(lambda: False, timeout=0.1)  # the server's SETTINGS
        block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")])
        headers = HeadersFrame(1)
        headers.data = block
        frames = [headers.serialize()]
        for _ in range(40):  # 40 KiB of header block, never ended (no END_HEADERS)
            continuation = ContinuationFrame(1)
            continuation.data = b"\x00" * 1024
            frames.append(continuation.serialize())
        client.write_raw(b"".join(frames))
        assert await client.wait_closed()
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await _still_served(fender)
    assert [r["path"] for r in echo_upstream.requests] == ["/other"]  # only the other connection's
    text = await _metrics(fender)
    assert _metric(text, "fender_http2_goaway_total", reason="header_too_large") == 1


async def test_endless_empty_continuation_frames(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with H2Client(fender.data_port) as client:
        headers = HeadersFrame(1)
        headers.data = Encoder().encode([(b":method", b"GET")])
        client.write_raw(headers.serialize() + ContinuationFrame(1).serialize() * 500)
        assert await client.wait_closed()
        assert client.goaway is not None
    await _still_served(fender)


async def test_hpack_bomb_is_cut_on_the_decoded_size(start_fender, echo_upstream):
    fender = await start_fender(
        policy_text(echo_upstream.port, server="http2: {max_header_list_size: 8KiB}\n")
    )
    async with H2Client(fender.data_port, validate=False) as client:
        # One 3000-byte field indexed once, then referenced: ~3 KiB on the wire, ~60 KiB decoded.
        big = [(b"x-bomb", b"a" * 3000)] * 20
        sid = client.request("/bomb", headers=big)
        assert await client.wait_closed()
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert not client.responses[sid].status
    await _still_served(fender)
    assert [r["path"] for r in echo_upstream.requests] == ["/other"]


async def test_settings_flood(start_fender, echo_upstream):
    fender = await start_fender(
        policy_text(echo_upstream.port, server="http2: {max_control_frames_per_second: 50}\n")
    )
    async with H2Client(fender.data_port) as client:
        client.write_raw(SettingsFrame(0).serialize() * 500)
        assert await client.wait_closed()
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await _still_served(fender)
    text = await _metrics(fender)
    assert _metric(text, "fender_http2_goaway_total", reason="control_flood") == 1


async def test_ping_flood(start_fender, echo_upstream):
    fender = await start_fender(
        policy_text(echo_upstream.port, server="http2: {max_control_frames_per_second: 50}\n")
    )
    async with H2Client(fender.data_port) as client:
        ping = PingFrame(0)
        ping.opaque_data = b"12345678"
        client.write_raw(ping.serialize() * 500)
        assert await client.wait_closed()
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await _still_served(fender)


async def test_zero_window_stream_is_cut_at_send_timeout(start_fender):
    gate, handler = _gated()
    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port, server="send_timeout: 300ms\n"))
        # The client's stream windows are 0: no response DATA may be sent until it opens them.
        async with H2Client(fender.data_port, settings={4: 0}) as client:
            sid = client.request("/big")
            response = await client.response(sid)
            assert response.status == 200
            assert response.body == b""
            assert response.reset == ErrorCodes.CANCEL
        await _still_served(fender)
        text = await _metrics(fender)
    assert _metric(text, "fender_http2_stream_resets_total", reason="flow_control_stall") == 1


async def test_zero_connection_window_closes_at_send_timeout(start_fender):
    gate, handler = _gated()
    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port, server="send_timeout: 300ms\n"))
        async with H2Client(fender.data_port) as client:
            client.auto_ack = False  # reads, never opens the connection's 64 KiB window again
            sid = client.request("/big")
            assert await client.wait_closed()
            assert len(client.responses[sid].body) == 65535
            assert not client.responses[sid].ended
        await _still_served(fender)
        text = await _metrics(fender)
    assert _metric(text, "fender_http2_goaway_total", reason="flow_control_stall") == 1


async def test_idle_connection_gets_goaway(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port, server="keepalive_timeout: 300ms\n"))
    async with H2Client(fender.data_port) as client:
        assert (await client.response(client.request("/once"))).status == 200
        assert await client.wait_closed()
        assert client.goaway.error_code == ErrorCodes.NO_ERROR
        assert client.goaway.last_stream_id == 1
    text = await _metrics(fender)
    assert _metric(text, "fender_http2_goaway_total", reason="idle") == 1


async def test_goaway_after_max_requests_per_connection(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port, server="max_requests_per_connection: 3\n"))
    async with H2Client(fender.data_port) as client:
        sids = [client.request(f"/r{i}") for i in range(3)]
        for sid in sids:
            assert (await client.response(sid)).status == 200
        await client.until(lambda: client.goaway is not None)
        assert client.goaway.error_code == ErrorCodes.NO_ERROR
        assert client.goaway.last_stream_id == 5
        assert await client.wait_closed()
    assert len(echo_upstream.requests) == 3


async def test_drain_sends_goaway_and_lets_streams_finish(start_fender):
    gate, handler = _gated()
    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port))
        async with H2Client(fender.data_port) as client:
            held = client.request("/hold")
            await up.wait_until(lambda: len(up.requests) == 1)
            drain = asyncio.ensure_future(fender.drain(0.0))
            await client.until(lambda: client.goaway is not None)
            assert client.goaway.error_code == ErrorCodes.NO_ERROR
            assert client.goaway.last_stream_id == held
            # A stream the client opens anyway after the GOAWAY is refused: it was never processed.
            late = client.request("/late")
            assert (await client.response(late)).reset == ErrorCodes.REFUSED_STREAM
            gate.set()
            response = await client.response(held)
            assert (response.status, response.body) == (200, b"ok")
            assert await client.wait_closed()
        await asyncio.wait_for(drain, 10)
    assert [r.target for r in up.requests] == [b"/hold"]


# --------------------------------------------------------------------------- stream errors, not connection errors


async def _open_then_finish(client: H2Client, path: str) -> int:
    """A POST whose body is still coming: it is in flight while the malformed stream is reset."""
    return client.request(path, "POST", [(b"content-length", b"4")], body=b"ab", end=False)


def _finish(client: H2Client, sid: int) -> None:
    client.conn.send_data(sid, b"cd", end_stream=True)
    client.flush()


async def test_content_length_contradicted_by_data_resets_only_that_stream(start_fender, echo_upstream):
    """RFC 9113 8.1.1: DATA longer or shorter than content-length (or a content-length that is no
    number) makes the request malformed, a stream error (RST_STREAM PROTOCOL_ERROR). The stream in
    flight before it and one opened after it, on the same connection, complete."""
    fender = await start_fender(policy_text(echo_upstream.port))
    cases = [
        ([(b"content-length", b"3")], b"toolong"),  # DATA past the length
        ([(b"content-length", b"10")], b"short"),  # END_STREAM before the length
        ([(b"content-length", b"1x")], b"x"),  # not a number
    ]
    async with H2Client(fender.data_port, validate=False) as client:
        for fields, body in cases:
            before = await _open_then_finish(client, "/before")
            bad = client.request("/bad", "POST", fields, body=body)
            bad_answer = await client.response(bad)
            assert bad_answer.reset == ErrorCodes.PROTOCOL_ERROR and not bad_answer.status
            _finish(client, before)
            after = client.request("/after")
            assert (await client.response(before)).status == 200
            assert (await client.response(after)).status == 200
        assert client.goaway is None and not client.closed
    assert [r["path"] for r in echo_upstream.requests].count("/bad") == 0
    assert len(echo_upstream.requests) == 6
    text = await _metrics(fender)
    assert _metric(text, "fender_http2_stream_resets_total", reason="malformed") == 3
    assert _metric(text, "fender_http2_goaway_total", reason="protocol_error") == 0


async def test_header_list_over_the_limit_is_a_431_on_its_stream(start_fender, echo_upstream):
    """A header list decoded past max_header_list_size (but short of a bomb) is refused on its stream
    with 431; the connection and its other streams go on."""
    fender = await start_fender(
        policy_text(echo_upstream.port, server="http2: {max_header_list_size: 8KiB}\n")
    )
    async with H2Client(fender.data_port, validate=False) as client:
        before = await _open_then_finish(client, "/before")
        big = [(b"x-big-%d" % n, b"v" * 1000) for n in range(12)]  # ~12 KiB decoded, 8 KiB allowed
        refused = await client.response(client.request("/big", headers=big))
        assert refused.status == 431 and refused.headers[b"x-fender-error"] == b"header_too_large"
        _finish(client, before)
        assert (await client.response(before)).status == 200
        assert (await client.response(client.request("/after"))).status == 200
        assert client.goaway is None and not client.closed
    assert [r["path"] for r in echo_upstream.requests] == ["/before", "/after"]
