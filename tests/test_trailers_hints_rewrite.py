"""Response trailers, 1xx informational answers (103 Early Hints) and rewrite_prefix, end to end."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import policy_text
from tests.support.raw_upstream import RawUpstream, Request, Responder

_LIMIT = 5.0


async def _exchange(port: int, request: bytes, until: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        seen = b""
        async with asyncio.timeout(_LIMIT):
            while until not in seen:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                seen += chunk
        return seen
    finally:
        writer.close()


def _dechunk(body: bytes) -> tuple[bytes, bytes]:
    """A chunked body's data and what follows its last chunk (the trailer section)."""
    data = b""
    for _ in range(1000):
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return data, body
        data += body[:size]
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]
    raise AssertionError("too many chunks")


def _chunked_with_trailers(trailers):
    async def handler(req: Request, conn: Responder) -> None:
        await conn.send_head(200, [(b"transfer-encoding", b"chunked"), (b"trailer", b"x-checksum, x-count")])
        await conn.send_chunk(b"hello ")
        await conn.send_chunk(b"world")
        await conn.end_chunks(trailers)

    return handler


_TE_REQUEST = b"GET /t HTTP/1.1\r\nHost: svc\r\nTE: trailers\r\nConnection: close\r\n\r\n"


async def _through_fender(start_fender, trailers, until: bytes, request: bytes = _TE_REQUEST):
    """What a client gets for ``request`` when the upstream sends a chunked body with ``trailers``."""
    async with RawUpstream(_chunked_with_trailers(trailers)) as up:
        fender = await start_fender(policy_text(up.port))
        return await _exchange(fender.data_port, request, until), up


async def test_trailers_reach_a_client_that_sent_te_trailers(start_fender):
    trailers = [(b"X-Checksum", b"abc123"), (b"X-Count", b"2")]
    out, up = await _through_fender(start_fender, trailers, b"x-count: 2\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\ntrailer: x-checksum, x-count" in head.lower()
    data, trailer_section = _dechunk(body)
    assert data == b"hello world"
    assert trailer_section == b"x-checksum: abc123\r\nx-count: 2\r\n\r\n"
    sent = up.requests[0].header("te")
    assert sent == b"trailers"  # TE: trailers is passed upstream, nothing else of TE


async def test_trailers_are_dropped_for_a_client_without_te_trailers(start_fender):
    out, up = await _through_fender(
        start_fender,
        [(b"X-Checksum", b"abc123")],
        b"\r\n0\r\n\r\n",
        b"GET /t HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
    )
    assert out.endswith(b"\r\n0\r\n\r\n")
    assert b"abc123" not in out
    assert up.requests[0].header("te") is None


async def test_forbidden_trailer_fields_are_never_relayed(start_fender):
    trailers = [
        (b"Host", b"evil"),
        (b"Authorization", b"Bearer x"),
        (b"Transfer-Encoding", b"gzip"),
        (b"X-Ok", b"1"),
    ]
    out, up = await _through_fender(start_fender, trailers, b"x-ok: 1\r\n\r\n")
    assert out.endswith(b"0\r\nx-ok: 1\r\n\r\n")
    assert b"evil" not in out and b"Bearer" not in out and b"gzip" not in out


@pytest.mark.parametrize("bad", [b"Content-Length: 9", b"X-Nul: a\x00b"])
async def test_a_trailer_section_llhttp_refuses_cuts_the_response(start_fender, bad):
    out, up = await _through_fender(start_fender, [tuple(bad.split(b": "))], b"never-there")
    assert out.startswith(b"HTTP/1.1 200 ")
    assert not out.endswith(b"\r\n\r\n")  # no terminating chunk: the client sees a cut response
    assert bad.split(b": ")[1] not in out.split(b"\r\n\r\n", 1)[1]


async def test_trailers_over_the_head_limit_are_a_bad_response(start_fender):
    big = [(b"X-Big-%d" % i, b"v" * 1000) for i in range(80)]  # 80 KB of trailers > 64 KiB limit
    out, up = await _through_fender(start_fender, big, b"never-there")
    # The head was sent already: the body is cut (no terminating chunk), never completed.
    assert out.startswith(b"HTTP/1.1 200 ")
    assert not out.endswith(b"0\r\n\r\n")
    assert b"X-Big" not in out and b"x-big" not in out


async def test_early_hints_reach_the_client_while_the_upstream_still_works(start_fender):
    release = asyncio.Event()

    async def handler(req: Request, conn: Responder) -> None:
        conn.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n")
        await release.wait()
        await conn.send(200, [(b"content-type", b"text/plain")], b"final")

    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        try:
            writer.write(b"GET /page HTTP/1.1\r\nHost: svc\r\n\r\n")
            async with asyncio.timeout(_LIMIT):
                hints = await reader.readuntil(b"\r\n\r\n")
            assert not release.is_set()  # the 103 arrived while the upstream holds the final answer
            assert hints.startswith(b"HTTP/1.1 103 Early Hints\r\n")
            assert b"link: </style.css>; rel=preload; as=style\r\n" in hints.lower()
            release.set()
            async with asyncio.timeout(_LIMIT):
                final = await reader.readuntil(b"final")
            assert final.startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()


async def test_no_interim_answers_for_an_http10_client(start_fender):
    async def handler(req: Request, conn: Responder) -> None:
        conn.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await conn.send(200, body=b"final")

    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port))
        out = await _exchange(fender.data_port, b"GET /page HTTP/1.0\r\nHost: svc\r\n\r\n", b"final")
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b"103" not in out.split(b"\r\n", 1)[0]
    assert b"</a.css>" not in out


async def test_100_continue_from_the_upstream_is_not_relayed(start_fender):
    async def handler(req: Request, conn: Responder) -> None:
        conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.send(200, body=b"final")

    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port))
        out = await _exchange(
            fender.data_port, b"GET /x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n", b"final"
        )
    assert out.startswith(b"HTTP/1.1 200 ")


_REWRITE_ROUTES = """
- name: a
  match: {path_prefix: /svc-a/}
  upstream: echo
  rewrite_prefix: /
- name: b
  match: {path_prefix: /svc-b}
  upstream: echo
  rewrite_prefix: /v2/
  explain: true
"""


@pytest.mark.parametrize(
    ("client_target", "upstream_target"),
    [
        (b"/svc-a/items", b"/items"),
        (b"/svc-a/items?x=1&y=2", b"/items?x=1&y=2"),
        (b"/svc-a/", b"/"),
        (b"/svc-a/a/../b", b"/b"),
        (b"/svc-b/items", b"/v2/items"),  # the replacement's slash and the rest's: one, never //
        (b"/svc-b", b"/v2/"),
        (b"/svc-b/../svc-a/x", b"/x"),  # normalised before matching: this is route a
    ],
)
async def test_rewrite_prefix(start_fender, echo_upstream, client_target, upstream_target):
    fender = await start_fender(policy_text(echo_upstream.port, _REWRITE_ROUTES))
    out = await _exchange(
        fender.data_port, b"GET %s HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n" % client_target, b"}"
    )
    assert out.startswith(b"HTTP/1.1 200 ")
    sent = echo_upstream.requests[-1]
    got = sent["path"].encode() + (b"?" + sent["query"].encode() if sent["query"] else b"")
    assert got == upstream_target


async def test_rewrite_is_shown_in_fender_trace(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port, _REWRITE_ROUTES))
    out = await _exchange(
        fender.data_port, b"GET /svc-b/items HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n", b"}"
    )
    trace = [line for line in out.split(b"\r\n") if line.lower().startswith(b"fender-trace:")]
    assert trace and b"rewrite /svc-b/items -> /v2/items" in trace[0]


def test_rewrite_prefix_without_path_prefix_is_refused_at_its_line():
    from proxy.config import PolicyError, parse_policy

    text = policy_text(
        1,
        """
        - name: a
          match: {path: /exact}
          upstream: echo
          rewrite_prefix: /
        """,
    )
    with pytest.raises(PolicyError) as refused:
        parse_policy(text, "p.yaml")
    message = str(refused.value)
    line = next(i for i, text_line in enumerate(text.splitlines(), 1) if "rewrite_prefix" in text_line)
    assert f"p.yaml:{line}:" in message
    assert "path_prefix" in message


async def test_a_rewritten_request_is_cached_under_the_client_path(start_fender):
    """The cache key keeps the client's path: a purge of /svc-a/ drops what /svc-a/x stored,
    though the upstream saw /x."""

    async def cacheable(req: Request, conn: Responder) -> None:
        await conn.send(200, [(b"cache-control", b"max-age=60")], b"v%d" % len(up.requests))

    routes = """
    - name: a
      match: {path_prefix: /svc-a/}
      upstream: echo
      rewrite_prefix: /
      cache: {}
    """
    async with RawUpstream(cacheable) as up:
        fender = await start_fender(policy_text(up.port, routes))
        request = b"GET /svc-a/x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
        first = await _exchange(fender.data_port, request, b"v1")
        hit = await _exchange(fender.data_port, request, b"v1")
        assert up.requests[0].target == b"/x" and len(up.requests) == 1
        assert b"cache-status: fender; hit" in hit.lower()
        async with httpx.AsyncClient() as client:
            purged = await client.post(fender.admin_url + "/admin/cache/purge", json={"prefix": "/svc-a/"})
        assert purged.json()["purged"] == 1
        after = await _exchange(fender.data_port, request, b"v2")
    assert first.endswith(b"v1") and after.endswith(b"v2")
    assert len(up.requests) == 2
