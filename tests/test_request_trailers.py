"""Request trailers pass to the upstream, both ways of arriving and both ways of leaving: HTTP/2
trailers (HEADERS with END_STREAM after DATA) and HTTP/1.1 chunked trailer fields, to an HTTP/2
replica (a HEADERS frame) and to an HTTP/1.1 replica (a chunked trailer section). Fields RFC 9110
6.5.1 keeps out of trailers are dropped; malformed HTTP/2 trailers reset their stream only; a
trailer section counts in the head limit. Real peers on loopback: a raw-frame h2 client
(tests/support/h2_client.py), hand-written HTTP/1.1, the h2-package replica and RawUpstream."""

from __future__ import annotations

import textwrap

from h2.errors import ErrorCodes

from tests.conftest import raw_request
from tests.support.h2_client import H2Client
from tests.support.h2_upstream import H2Upstream
from tests.support.raw_upstream import RawUpstream, Request, Responder


def policy(port: int, protocol: str = "http1", server: str = "") -> str:
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        upstreams:
          svc:
            replicas: [{{url: "http://127.0.0.1:{port}"}}]
            protocol: {protocol}
        routes:
          - {{name: all, upstream: svc, timeout: 5s}}
        """
    ) + (f"server:\n  {server}\n" if server else "")


SENT = [
    (b"x-checksum", b"abc123"),
    (b"content-type", b"text/evil"),  # may not be a trailer (RFC 9110 6.5.1)
    (b"x-forwarded-for", b"6.6.6.6"),  # Fender's own field
    (b"fender-deadline-ms", b"1"),
    (b"x-count", b"3"),
]
KEPT = [(b"x-checksum", b"abc123"), (b"x-count", b"3")]


def h2_post_with_trailers(client: H2Client, path: str, length: bool = False) -> int:
    fields = [(b"content-length", b"9")] if length else []
    sid = client.request(path, "POST", fields, body=b"part-one-"[: 9 if length else 5], end=False)
    if not length:
        client.conn.send_data(sid, b"more")
    client.conn.send_headers(sid, SENT, end_stream=True)
    client.flush()
    return sid


def chunked_with_trailers(path: str) -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\nContent-Type: text/evil\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"Fender-Deadline-Ms: 1\r\nX-Count: 3\r\n\r\n" % path.encode()
    )


async def _chunked_echo(req: Request, conn: Responder) -> None:
    await conn.send(200, body=b"ok")


async def test_h2_trailers_reach_an_h2_replica(start_fender):
    up = await H2Upstream().start()
    try:
        fender = await start_fender(policy(up.port, "h2"))
        async with H2Client(fender.data_port) as client:
            streamed = await client.response(h2_post_with_trailers(client, "/echo"))
            buffered = await client.response(h2_post_with_trailers(client, "/echo", length=True))
            plain = await client.response(client.request("/echo", "POST", body=b"no trailers"))
        assert streamed.status == buffered.status == plain.status == 200
        assert streamed.body == b"part-more" and buffered.body == b"part-one-"
        # Streamed (no content-length) and buffered (content-length) bodies both end with the trailers.
        assert up.request_trailers == [("/echo", KEPT), ("/echo", KEPT)]
    finally:
        await up.stop()


async def test_http1_chunked_trailers_reach_h2_and_http1_replicas(start_fender):
    up = await H2Upstream().start()
    try:
        fender = await start_fender(policy(up.port, "h2"))
        raw = await raw_request(fender.data_port, chunked_with_trailers("/echo"))
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"5\r\nhello\r\n0\r\n\r\n")
        assert up.request_trailers == [("/echo", KEPT)]
    finally:
        await up.stop()
    async with RawUpstream(_chunked_echo) as h1:
        fender = await start_fender(policy(h1.port))
        raw = await raw_request(fender.data_port, chunked_with_trailers("/h1"))
        assert raw.startswith(b"HTTP/1.1 200")
        (req,) = h1.requests
        assert req.header("transfer-encoding") == b"chunked"
        assert req.raw.endswith(b"5\r\nhello\r\n0\r\nx-checksum: abc123\r\nx-count: 3\r\n\r\n")


async def test_h2_trailers_reach_an_http1_replica_as_a_chunked_trailer_section(start_fender):
    async with RawUpstream(_chunked_echo) as h1:
        fender = await start_fender(policy(h1.port))
        async with H2Client(fender.data_port) as client:
            answer = await client.response(h2_post_with_trailers(client, "/h2-to-h1"))
        assert answer.status == 200
        (req,) = h1.requests
        assert req.raw.endswith(b"0\r\nx-checksum: abc123\r\nx-count: 3\r\n\r\n")


async def test_malformed_h2_trailers_reset_their_stream_only(start_fender):
    """A pseudo-header field in trailers (RFC 9113 8.1), an upper-case name (8.2.1), or trailers that
    end a body short of its content-length: RST_STREAM PROTOCOL_ERROR; the connection goes on."""
    up = await H2Upstream().start()
    try:
        fender = await start_fender(policy(up.port, "h2"))
        async with H2Client(fender.data_port, validate=False) as client:
            for trailers, fields, body in (
                ([(b":path", b"/x")], [], b"data"),
                ([(b"X-Upper", b"1")], [], b"data"),
                ([(b"x-fine", b"1")], [(b"content-length", b"10")], b"short"),
            ):
                sid = client.request("/echo", "POST", fields, body=body, end=False)
                client.conn.send_headers(sid, trailers, end_stream=True)
                client.flush()
                answer = await client.response(sid)
                assert answer.reset == ErrorCodes.PROTOCOL_ERROR, trailers
            fine = await client.response(client.request("/echo", "POST", body=b"ok"))
            assert fine.status == 200 and client.goaway is None
        assert up.request_trailers == []  # none of them went on with its trailers
    finally:
        await up.stop()


async def test_a_trailer_section_counts_in_the_head_limit(start_fender):
    async with RawUpstream(_chunked_echo, expect_errors=True) as h1:
        fender = await start_fender(policy(h1.port, server="max_header_bytes: 2KiB"))
        huge = b"x-pad: " + b"p" * 3000 + b"\r\n"
        raw = await raw_request(
            fender.data_port,
            b"POST /big HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
            + huge
            + b"\r\n",
        )
        assert b"x-pad" not in b"".join(r.raw for r in h1.requests)  # never forwarded
        # One write: the parser meets the trailer section before the request's task ran, so it is refused.
        assert raw.startswith(b"HTTP/1.1 431") and b"x-fender-error: header_too_large" in raw
