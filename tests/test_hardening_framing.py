"""Request framing and header hardening (RFC 9112), end to end over real sockets.

Every request that could be framed two ways is refused with 400 (or 501/505
for valid-but-unsupported framing) and the connection is closed; the upstream
(a RawUpstream that records every byte it gets) sees no connection at all.
Each test ends with the ``checked_fender`` checks: Fender still answers, and
fds and tasks are back to their baseline.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import policy_text
from tests.support import procs
from tests.support.raw_client import RawClient, exchange
from tests.support.raw_upstream import RawUpstream, echo

checked_fender = procs.checked_fender  # the fixture: Fender alive and no fd/task leak after each test

H = b"Host: svc\r\n"

# (id, request bytes, expected status); each one is ambiguous, malformed or unsupported framing.
REFUSED = [
    (
        "cl-and-te",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-and-cl",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "cl-differing",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    (
        "cl-duplicate-same",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    ("cl-plus-sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", 400),
    ("cl-overflow", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    ("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    (
        "te-chunked-identity",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nhello", 400),
    (
        "te-twice",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "te-space-before-colon",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("te-in-http10", b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (
        "te-gzip-chunked",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold-te", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n", 400),
    ("nul-in-name", b"GET / HTTP/1.1\r\n" + H + b"X-\x00A: b\r\n\r\n", 400),
    ("ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x01c\r\n\r\n", 400),
    ("del-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\x7fc\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\rX-B: c\r\n\r\n", 400),
    ("bare-lf-line-ends", b"GET / HTTP/1.1\nHost: svc\nX-A: b\n\n", 400),
    ("bare-lf-injected", b"GET / HTTP/1.1\r\n" + H + b"X-A: b\nX-Forwarded-For: 1.2.3.4\r\n\r\n", 400),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n", 400),
    (
        "chunk-size-not-hex",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-negative",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-overflow",
        b"POST / HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-0x",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-size-trailing-space",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunk-data-overrun",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        400,
    ),
    ("chunk-bare-lf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n", 400),
    ("host-missing", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("host-twice-differing", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("host-twice-same", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    ("host-empty", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    ("host-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host-userinfo", b"GET / HTTP/1.1\r\nHost: user@svc\r\n\r\n", 400),
    ("host-path", b"GET / HTTP/1.1\r\nHost: svc/admin\r\n\r\n", 400),
    ("host-bad-port", b"GET / HTTP/1.1\r\nHost: svc:80x\r\n\r\n", 400),
    ("host-bad-ipv6", b"GET / HTTP/1.1\r\nHost: [zz::1]\r\n\r\n", 400),
    ("absolute-form-other-host", b"GET http://evil.example/x HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 400),
    (
        "connect-origin-form",
        b"CONNECT / HTTP/1.1\r\n" + H + b"\r\n",
        400,
    ),  # would make a pooled connection a tunnel
    ("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad-escape", b"GET /%zz HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("http-0.9", b"GET /\r\n\r\n", 505),
    ("http-2.0-text", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("garbage", b"GARBAGE\r\n\r\n", 400),
]


@pytest.fixture
async def upstream():
    async with RawUpstream(echo) as up:
        yield up


async def test_ambiguous_or_malformed_requests_are_refused_closed_and_never_forwarded(
    upstream, checked_fender
):
    fender = await checked_fender(policy_text(upstream.port))
    wrong = []
    for name, data, status in REFUSED:
        response = await exchange(fender.data_port, data)
        if not (
            response.status == status
            and response.closed
            and response.headers.get(b"connection") == b"close"
            and b"x-fender-error" in response.headers
        ):
            wrong.append((name, response))
    assert wrong == []
    assert upstream.connections == 0 and upstream.requests == []


async def test_refusals_hold_when_the_head_arrives_in_small_pieces(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    wrong = []
    for name, data, status in REFUSED:
        parts = [data[i : i + 7] for i in range(0, len(data), 7)]
        response = await exchange(fender.data_port, parts, delay=0.001)
        if response.status != status or not response.closed:
            wrong.append((name, response))
    assert wrong == []
    # a split head is only dispatched once complete; a bad chunk after a complete head may
    # open an upstream connection, but no request ever completes there
    assert upstream.requests == []


async def test_bad_chunk_after_the_head_was_forwarded_never_completes_upstream(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    async with RawClient(fender.data_port) as client:
        await client.send(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        # the head and first chunk are on their way upstream before the bad chunk arrives
        await upstream.wait_until(lambda: upstream.connections == 1)
        await client.send(b"zz\r\nmore\r\n0\r\n\r\n")
        assert await client.wait_closed()
    assert client.received.startswith(b"HTTP/1.1 400")
    # the upstream never received a complete request, and its connection was dropped
    await upstream.wait_until(lambda: upstream.open_connections == 0)
    assert upstream.requests == []


async def test_valid_framing_variants_are_forwarded_reframed(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    cases = [
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /b HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding:\tchunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"\r\nPOST /c HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\n\r\nhello",  # one leading empty line is allowed
    ]
    for data in cases:
        response = await exchange(fender.data_port, data)
        assert response.status == 200 and response.body == b"hello"
    assert [r.target for r in upstream.requests] == [b"/a", b"/b", b"/c"]
    for r in upstream.requests:
        # only Fender's own serialisation reaches the upstream: one framing header, never TE + CL
        assert r.header(b"transfer-encoding") is None or r.header(b"content-length") is None
        head = r.raw.partition(b"\r\n\r\n")[0]
        assert b"x-trailer" not in head.lower() and b";ext" not in r.raw  # a trailer stays a trailer


async def test_trailer_fields_never_become_headers(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    data = (
        b"POST /t HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nHost: evil\r\nX-Trailer: t\r\n\r\n"
    )
    for parts in ([data], [data[:60], data[60:]]):
        response = await exchange(fender.data_port, parts)
        assert response.status == 200 and response.body == b"hello"
    for seen in upstream.requests:
        assert seen.header(b"host") == b"svc" and seen.header(b"x-forwarded-for") == b"127.0.0.1"
        # Never merged into the head; the trailer section passes without Host and X-Forwarded-For.
        assert b"x-trailer" not in seen.raw.partition(b"\r\n\r\n")[0].lower()
        assert b"evil" not in seen.raw and b"6.6.6.6" not in seen.raw
        assert seen.raw.endswith(b"5\r\nhello\r\n0\r\nx-trailer: t\r\n\r\n")
    assert len(upstream.requests) == 2


async def test_pipelined_requests_answered_in_order(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    async with RawClient(fender.data_port) as client:
        await client.send(b"".join(b"GET /%d HTTP/1.1\r\n%s\r\n" % (i, H) for i in range(5)))
        targets = [(await client.response()).headers[b"x-echo-target"] for _ in range(5)]
    assert targets == [b"/0", b"/1", b"/2", b"/3", b"/4"]


async def test_pipelined_request_after_a_refused_one_is_not_served(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    smuggled = (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    smuggled += b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    response = await exchange(fender.data_port, smuggled)
    assert response.status == 400 and response.closed
    assert upstream.connections == 0


async def test_connection_header_cannot_remove_headers_fender_adds(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    response = await exchange(
        fender.data_port,
        b"GET /c HTTP/1.1\r\n" + H + b"Connection: X-Forwarded-For, Via, X-Request-Id, X-Forwarded-Proto, "
        b"X-Forwarded-Host, Host\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    )
    assert response.status == 200
    seen = upstream.requests[0]
    assert seen.header(b"x-forwarded-for") == b"127.0.0.1"  # untrusted peer: its value is replaced
    assert seen.header(b"via") == b"1.1 fender"
    assert seen.header(b"x-forwarded-proto") == b"http"
    assert seen.header(b"x-forwarded-host") == b"svc"
    assert seen.header(b"host") == b"svc"
    assert seen.header(b"x-request-id") == response.headers[b"x-request-id"]
    assert seen.header(b"connection") != b"X-Forwarded-For"


async def test_crlf_cannot_be_injected_into_forwarded_headers(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    # a bare CR or LF inside a value would end the line differently for another parser
    for value in (b"a\rX-Injected: 1", b"a\nX-Injected: 1", b"a\r \nX-Injected: 1", b"a\x0bX-Injected: 1"):
        response = await exchange(
            fender.data_port, b"GET / HTTP/1.1\r\n" + H + b"X-A: " + value + b"\r\n\r\n"
        )
        assert response.status == 400, value
    # an encoded CRLF in the target stays encoded on the request line Fender writes
    response = await exchange(fender.data_port, b"GET /a%0d%0aX-Injected:%201 HTTP/1.1\r\n" + H + b"\r\n")
    assert response.status == 200
    assert upstream.requests[-1].target == b"/a%0D%0AX-Injected:%201"
    # an X-Request-Id with odd bytes is replaced, not passed on
    response = await exchange(fender.data_port, b"GET / HTTP/1.1\r\n" + H + b'X-Request-Id: a b"c\r\n\r\n')
    assert response.status == 200 and response.headers[b"x-request-id"] != b'a b"c'
    assert len(upstream.requests) == 2
    for seen in upstream.requests:
        assert seen.header(b"x-injected") is None
        assert seen.raw.count(b"\r\n\r\n") == 1


@pytest.mark.parametrize("mode", ["drop", "reject", "allow"])
async def test_headers_with_underscores(upstream, checked_fender, mode):
    fender = await checked_fender(policy_text(upstream.port, server=f"headers_with_underscores: {mode}\n"))
    response = await exchange(
        fender.data_port, b"GET /u HTTP/1.1\r\n" + H + b"X_Forwarded_For: 6.6.6.6\r\nX-Fine: 1\r\n\r\n"
    )
    if mode == "reject":
        assert response.status == 400 and response.closed
        assert response.headers[b"x-fender-error"] == b"underscore_header"
        assert upstream.connections == 0
        return
    assert response.status == 200
    seen = upstream.requests[0]
    assert seen.header(b"x-fine") == b"1"
    assert (seen.header(b"x_forwarded_for") == b"6.6.6.6") == (mode == "allow")


async def test_underscore_headers_are_dropped_by_default(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    response = await exchange(fender.data_port, b"GET / HTTP/1.1\r\n" + H + b"Api_Key: k\r\n\r\n")
    assert response.status == 200
    assert upstream.requests[0].header(b"api_key") is None


ROUTES = """
  - name: public
    match: {path_prefix: /public/}
    upstream: echo
"""


@pytest.mark.parametrize(
    "target,forwarded",
    [
        (b"/public/a/./b", b"/public/a/b"),
        (b"/public//a///b", b"/public/a/b"),
        (b"/public/a/../b", b"/public/b"),
        (b"/public/%61bc", b"/public/abc"),  # unreserved escapes are decoded
        (b"/public/a%2fb", b"/public/a%2Fb"),  # %2F is kept (never splits a segment), upper-cased
        (b"/public/..%2Fadmin", b"/public/..%2Fadmin"),  # so it is no dot segment either
        (b"/public/x?q=/../admin", b"/public/x?q=/../admin"),  # the query is not a path
        (b"/public/a#frag/../../admin", b"/public/a"),  # a fragment is never sent upstream
    ],
)
async def test_normalised_path_is_routed_and_forwarded(upstream, checked_fender, target, forwarded):
    fender = await checked_fender(policy_text(upstream.port, ROUTES))
    response = await exchange(fender.data_port, b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert response.status == 200
    assert upstream.requests[-1].target == forwarded


@pytest.mark.parametrize(
    "target",
    [
        b"/public/../admin",
        b"/public/%2e%2e/admin",
        b"/public/%2E%2E/admin",
        b"/public/.%2e/admin",
        b"/public/%2e%2e%2fadmin",  # stays one segment "..%2Fadmin" under /public? no: it is "/public/..%2Fadmin"
        b"//admin",
        b"/PUBLIC/x",
    ],
)
async def test_escapes_out_of_the_route_prefix_reach_no_upstream(upstream, checked_fender, target):
    fender = await checked_fender(policy_text(upstream.port, ROUTES))
    response = await exchange(fender.data_port, b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")
    if target == b"/public/%2e%2e%2fadmin":
        # decoded dots but a kept %2F: a single segment under /public, forwarded as such
        assert response.status == 200
        assert upstream.requests[-1].target == b"/public/..%2Fadmin"
        return
    assert response.status == 404 and response.headers[b"x-fender-error"] == b"no_route"
    assert upstream.connections == 0


async def test_absolute_form_for_the_same_host_is_served_on_its_path(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    response = await exchange(fender.data_port, b"GET http://svc/p/../q HTTP/1.1\r\n" + H + b"\r\n")
    assert response.status == 200
    assert upstream.requests[0].target == b"/q"
    assert upstream.requests[0].header(b"host") == b"svc"


async def test_refusals_are_counted_in_metrics(upstream, checked_fender):
    import httpx

    fender = await checked_fender(policy_text(upstream.port))
    await exchange(fender.data_port, b"GET / HTTP/1.1\r\n" + H + b"X-A: \x00\r\n\r\n")
    await exchange(fender.data_port, b"GET / HTTP/2.0\r\n" + H + b"\r\n")
    async with httpx.AsyncClient() as client:
        text = (await client.get(fender.admin_url + "/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith("fender_local_responses_total{")]
    assert 'fender_local_responses_total{reason="bad_request",route="-"} 1.0' in lines, lines
    assert 'fender_local_responses_total{reason="http_version",route="-"} 1.0' in lines, lines
    json.dumps(lines)


async def test_upgrade_requests_are_served_as_plain_http_and_the_connection_closes(upstream, checked_fender):
    fender = await checked_fender(policy_text(upstream.port))
    async with RawClient(fender.data_port) as client:
        await client.send(
            b"GET /u HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /after HTTP/1.1\r\n" + H + b"\r\n"
        )
        response = await client.response()
        assert await client.wait_closed()
    assert response.status == 200 and response.headers[b"x-echo-target"] == b"/u"
    assert response.headers[b"connection"] == b"close"
    seen = upstream.requests[0]
    assert seen.header(b"upgrade") is None and seen.header(b"http2-settings") is None
    # bytes after an upgrade request are never parsed as another request
    assert [r.target for r in upstream.requests] == [b"/u"]


async def test_garbage_after_a_request_never_lands_inside_its_response(checked_fender):
    release = asyncio.Event()

    async def streamed(req, conn):
        await conn.send_head(200, [(b"transfer-encoding", b"chunked")])
        await conn.send_chunk(b"first ")
        await asyncio.wait_for(release.wait(), 5)
        await conn.send_chunk(b"second")
        await conn.end_chunks()

    async with RawUpstream(streamed) as up:
        fender = await checked_fender(policy_text(up.port))
        async with RawClient(fender.data_port) as client:
            await client.send(b"GET /s HTTP/1.1\r\n" + H + b"\r\n")
            assert await client.read_until(b"\r\n\r\n")  # the head is out (the body is read one chunk ahead)
            # the response is streaming; now the client sends garbage as its next request
            await client.send(b"GARBAGE\x00\r\n\r\n")
            release.set()
            response = await client.response()
            assert await client.wait_closed()
        assert response.status == 200 and response.complete and response.body == b"first second"
        assert b"400" not in client.received.split(b"\r\n\r\n", 1)[1]
        assert len(up.requests) == 1
