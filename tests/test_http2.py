"""HTTP/2 on the data listener, end to end: h2c with prior knowledge on the HTTP/1.1 port, every stream
one request through the data plane to an HTTP/1.1 replica; real clients (curl, h2load, grpcio) and a
raw-frame client (tests/support/h2_client.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil

import httpx
import pytest
from h2.errors import ErrorCodes

from tests.conftest import policy_text, raw_request
from tests.support.h2_client import H2Client, H2Response
from tests.support.need import missing, need_module
from tests.support.raw_upstream import RawUpstream, Request, Responder


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not installed: apt-get install {package}")
    return path


async def _run(*argv: str, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out, err


async def test_curl_prior_knowledge_same_port_as_http1(start_fender, echo_upstream):
    curl = _tool("curl", "curl")
    fender = await start_fender(policy_text(echo_upstream.port))
    code, out, err = await _run(
        curl, "-sS", "--http2-prior-knowledge", "--max-time", "10", "-w", "\n%{http_version}",
        "-H", "Cookie: a=1", "-H", "Cookie: b=2", f"{fender.url}/hello?x=1",
    )  # fmt: skip
    assert code == 0, err
    body, _, version = out.rpartition(b"\n")
    assert version == b"2"
    seen = json.loads(body)
    headers = dict(seen["headers"])
    # :authority is the Host; cookie fields joined for HTTP/1.1 (RFC 9113 8.2.3); Via names HTTP/2.
    assert headers["host"] == f"127.0.0.1:{fender.data_port}"
    assert headers["cookie"] == "a=1; b=2"
    assert headers["via"] == "2 fender"
    assert (seen["path"], seen["query"]) == ("/hello", "x=1")

    payload = bytes(range(256)) * 40
    code, out, err = await _run(
        curl, "-sS", "--http2-prior-knowledge", "--max-time", "10", "--data-binary", "@-",
        f"{fender.url}/upload",
    )  # fmt: skip
    # (an empty stdin upload is fine for curl; the body check is on the HTTP/1.1 side below)
    assert code == 0, err
    async with httpx.AsyncClient() as client:  # HTTP/1.1 on the same port still works
        response = await client.post(f"{fender.url}/h1", content=payload)
    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_curl_large_upload_and_download(start_fender, echo_upstream, tmp_path):
    curl = _tool("curl", "curl")
    fender = await start_fender(
        policy_text(echo_upstream.port, "- {name: all, upstream: echo, max_body: 8MiB}\n")
    )
    # Larger than a stream's window (1 MiB): the upload moves as the upstream reads it.
    payload = bytes(range(256)) * (3 * 4096)
    source = tmp_path / "upload.bin"
    source.write_bytes(payload)
    code, out, err = await _run(
        curl, "-sS", "--http2-prior-knowledge", "--max-time", "20", "--data-binary", f"@{source}",
        "-H", "content-type: application/octet-stream", f"{fender.url}/hash",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["body_sha256"] == hashlib.sha256(payload).hexdigest()
    code, out, err = await _run(
        curl, "-sS", "--http2-prior-knowledge", "--max-time", "20", "-o", "-",
        f"{fender.url}/stream?size=3000000&chunk=65536",
    )  # fmt: skip
    assert code == 0, err
    assert len(out) == 3_000_000


async def test_h2load_multiplexed_streams(start_fender, echo_upstream):
    h2load = _tool("h2load", "nghttp2-client")
    fender = await start_fender(policy_text(echo_upstream.port))
    # 2 connections x 50 concurrent streams, 300 requests: every one answered 200.
    code, out, err = await _run(h2load, "-n", "300", "-c", "2", "-m", "50", f"{fender.url}/load")
    assert code == 0, err
    text = out.decode()
    assert "300 succeeded, 0 failed, 0 errored" in text, text
    assert "status codes: 300 2xx" in text, text
    assert len(echo_upstream.requests) == 300


_MALFORMED = {
    "uppercase name": [(b"X-Upper", b"1")],
    "connection field": [(b"connection", b"keep-alive")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "te other than trailers": [(b"te", b"gzip")],
    "pseudo after regular": [(b"x-a", b"1"), (b":method", b"GET")],
    "unknown pseudo": [(b":protocol", b"websocket")],
    "response pseudo": [(b":status", b"200")],
    "host differs from :authority": [(b"host", b"other.example")],
    "value with a leading space": [(b"x-a", b" 1")],
    "name with a space": [(b"x a", b"1")],
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
async def test_malformed_stream_is_reset_never_forwarded(start_fender, echo_upstream, case):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with H2Client(fender.data_port, validate=False) as client:
        bad = client.request("/bad", headers=_MALFORMED[case])
        response = await client.response(bad)
        assert response.reset == ErrorCodes.PROTOCOL_ERROR
        # The connection goes on: the next stream is served.
        good = client.request("/good")
        response = await client.response(good)
        assert response.status == 200
    assert [r["path"] for r in echo_upstream.requests] == ["/good"]


async def test_missing_or_repeated_pseudo_fields_are_malformed(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port))
    async with H2Client(fender.data_port, validate=False) as client:
        sids = []
        for fields in (
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc")],  # no :path
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a"), (b":path", b"/b")],
            [(b":method", b"GET"), (b":path", b"/a")],  # no :scheme
        ):
            sid = client.conn.get_next_available_stream_id()
            client.responses[sid] = H2Response()
            client.conn.send_headers(sid, fields, end_stream=True)
            client.flush()
            sids.append(sid)
        for sid in sids:
            assert (await client.response(sid)).reset == ErrorCodes.PROTOCOL_ERROR
    assert echo_upstream.requests == []


async def test_response_trailers_pass_over_http2(start_fender):
    async def handler(req: Request, conn: Responder) -> None:
        await conn.send_head(
            200, [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/grpc")]
        )
        await conn.send_chunk(b"\x00\x00\x00\x00\x02hi")
        await conn.end_chunks([(b"grpc-status", b"0"), (b"grpc-message", b"fine")])

    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port))
        async with H2Client(fender.data_port) as client:
            sid = client.request("/svc.Echo/Call", "POST", [(b"te", b"trailers")], body=b"")
            response = await client.response(sid)
    assert response.status == 200
    assert response.body == b"\x00\x00\x00\x00\x02hi"
    assert response.trailers == {b"grpc-status": b"0", b"grpc-message": b"fine"}
    # The HTTP/1.1 replica got the translated request: a Host, TE: trailers, no h2 pseudo-fields.
    assert up.requests[0].header(b"host") == b"svc"
    assert up.requests[0].header(b"te") == b"trailers"


async def test_body_limit_per_stream(start_fender, echo_upstream):
    routes = """
      - name: small
        upstream: echo
        max_body: 1KiB
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes))
    async with H2Client(fender.data_port) as client:
        # No content-length: the limit is found while the body streams.
        sid = client.request("/up", "POST", body=b"x" * 4000)
        response = await client.response(sid)
        assert response.status == 413
        assert response.headers[b"x-fender-error"] == b"body_too_large"
        sid = client.request("/up", "POST", [(b"content-length", b"100")], body=b"y" * 100)
        assert (await client.response(sid)).status == 200
    assert [r["body_length"] for r in echo_upstream.requests] == [100]


async def test_slow_stream_never_stalls_the_others(start_fender):
    """A stream whose upstream does not read its body, and one whose client does not read its
    response, leave the connection's other streams served."""
    release = asyncio.Event()

    async def handler(req: Request, conn: Responder) -> None:
        if req.target.startswith(b"/stuck-upload"):
            await release.wait()  # reads nothing of the body until the end of the test
            await conn.send(200, body=b"late")
        elif req.target.startswith(b"/big"):
            await conn.send(200, body=b"z" * 200_000)
        else:
            await conn.send(200, body=b"small")

    async with RawUpstream(handler, stream_request_body=True) as up:
        fender = await start_fender(policy_text(up.port))
        # The client's stream windows are 1000 bytes and it never opens them again.
        async with H2Client(fender.data_port, settings={4: 1000}) as client:
            client.auto_ack = False
            stuck = client.request("/stuck-upload", "POST", end=False)
            window = client.conn.local_flow_control_window(stuck)
            for _ in range(100):  # a whole stream window, never read upstream
                size = min(window, 16384)
                if size <= 0:
                    break
                client.conn.send_data(stuck, b"u" * size)
                window -= size
            client.flush()
            big = client.request("/big")
            await client.until(lambda: len(client.responses[big].body) >= 1000)
            small = client.request("/small")
            response = await client.response(small)
            assert (response.status, response.body) == (200, b"small")
            assert not client.responses[big].ended
            assert len(client.responses[big].body) == 1000
            release.set()


async def test_http2_disabled_answers_the_preface_as_http1(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port, server="http2: {enabled: false}\n"))
    answer = await raw_request(fender.data_port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_preface_split_across_reads(start_fender, echo_upstream):
    fender = await start_fender(policy_text(echo_upstream.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
    try:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        data = conn.data_to_send()
        for piece in (data[:5], data[5:17], data[17:20], data[20:]):  # the preface in pieces
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)
        conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"),
                              (b":path", b"/split")], end_stream=True)  # fmt: skip
        writer.write(conn.data_to_send())
        status = None
        async with asyncio.timeout(5):
            while status is None:
                chunk = await reader.read(65536)
                assert chunk, "closed before answering"
                for event in conn.receive_data(chunk):
                    headers = getattr(event, "headers", None)
                    if headers:
                        status = dict(headers)[b":status"]
                writer.write(conn.data_to_send())
        assert status == b"200"
    finally:
        writer.close()
    assert echo_upstream.requests[-1]["path"] == "/split"


def _grpc():
    return need_module("grpc", "pip install 'fender[test]' (grpcio)")


async def test_grpc_local_replies_for_a_grpcio_client(start_fender, echo_upstream):
    grpc = _grpc()
    routes = """
      - name: limited
        match: {path_prefix: /svc.Limited/}
        upstream: echo
        rate_limit: {rate: 1/m, burst: 1}
    """
    fender = await start_fender(policy_text(echo_upstream.port, routes))

    def calls() -> list:
        results = []
        with grpc.insecure_channel(f"127.0.0.1:{fender.data_port}") as channel:
            for method in ("/svc.Unknown/Call", "/svc.Limited/Call", "/svc.Limited/Call"):
                call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
                try:
                    call(b"\x08\x01", timeout=10)
                    results.append(("ok", None, None))
                except grpc.RpcError as error:
                    metadata = dict(error.trailing_metadata() or ())
                    results.append((error.code(), error.details(), metadata.get("x-fender-error")))
        return results

    unknown, first, limited = await asyncio.to_thread(calls)
    assert unknown[0] == grpc.StatusCode.UNIMPLEMENTED
    assert unknown[1].startswith("no route matches this request")
    assert unknown[2] == "no_route"
    # The first limited call reached the HTTP/1.1 echo replica, which cannot speak gRPC (its JSON
    # answer is no gRPC response): what matters is that the second one never left Fender.
    assert first[0] != grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited[2] == "rate_limited"
    assert [r["path"] for r in echo_upstream.requests] == ["/svc.Limited/Call"]


async def test_grpc_local_reply_shape_over_http2_and_http1(start_fender, echo_upstream):
    """A trailers-only answer: HTTP 200, grpc-status and grpc-message in the one HEADERS frame
    (END_STREAM, no DATA), X-Fender-Error kept; an HTTP/1.1 gRPC-Web-ish caller gets the same
    fields on an empty 200; a non-gRPC request keeps the plain 404."""
    fender = await start_fender(
        policy_text(echo_upstream.port, "- {name: only, match: {path_prefix: /x}, upstream: echo}\n")
    )
    async with H2Client(fender.data_port) as client:
        sid = client.request(
            "/pkg.Svc/M",
            "POST",
            [(b"content-type", b"application/grpc+proto"), (b"te", b"trailers")],
            body=b"",
        )
        response = await client.response(sid)
        plain = client.request("/nothing")
        plain_response = await client.response(plain)
    assert response.status == 200
    assert response.headers[b"grpc-status"] == b"12"
    assert response.headers[b"x-fender-error"] == b"no_route"
    assert response.headers[b"content-type"] == b"application/grpc"
    assert response.body == b""
    assert plain_response.status == 404
    async with httpx.AsyncClient() as http1:
        answer = await http1.post(f"{fender.url}/pkg.Svc/M", headers={"content-type": "application/grpc"})
    assert answer.status_code == 200
    assert answer.headers["grpc-status"] == "12"
    assert answer.content == b""


async def test_alpn_h2_over_tls_selects_http2(start_fender, echo_upstream, tmp_path):
    """The listener has no TLS of its own yet: this serves the data plane's protocol on a TLS socket
    offering ALPN h2 and http/1.1, as the TLS listener will, and checks both choices."""
    import ssl

    import uvicorn
    from uvicorn.server import ServerState

    openssl = _tool("openssl", "openssl")
    curl = _tool("curl", "curl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    code, _, err = await _run(
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
    )  # fmt: skip
    assert code == 0, err
    fender = await start_fender(policy_text(echo_upstream.port))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    config = uvicorn.Config(
        fender.dataplane, http=fender.protocol, loop="none", lifespan="off", log_config=None
    )
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: fender.protocol(config, state), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        versions = []
        for flag in ("--http2", "--http1.1"):
            code, out, err = await _run(
                curl, "-sS", "-k", flag, "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                f"https://127.0.0.1:{port}/tls",
            )  # fmt: skip
            assert code == 0, err
            versions.append(out.decode())
    finally:
        for connection in list(state.connections):
            connection.transport.close()
        server.close()
        await server.wait_closed()
    assert versions == ["200 2", "200 1.1"]
    assert [r["path"] for r in echo_upstream.requests] == ["/tls", "/tls"]
    forwarded = dict(echo_upstream.requests[0]["headers"])
    assert forwarded["x-forwarded-proto"] == "https"


async def test_route_rules_hold_per_stream(start_fender, capsys):
    """Host matching on :authority, a route's timeout, Fender-Trace, retries, metrics and the JSON
    access log: the same for a stream as for an HTTP/1.1 request."""
    import logging

    gate = asyncio.Event()

    async def handler(req: Request, conn: Responder) -> None:
        if req.target.startswith(b"/slow"):
            await gate.wait()
        await conn.send(200, body=b"fine")

    routes = """
      - name: api
        match: {path_prefix: /, host: api.example}
        upstream: echo
        timeout: 200ms
        explain: true
    """
    access = logging.getLogger("fender.access")
    saved = (list(access.handlers), access.propagate, access.level)
    try:
        async with RawUpstream(handler) as up:
            server = "access_log: true\naccess_log_format: json\n"
            fender = await start_fender(policy_text(up.port, routes, server=server))
            capsys.readouterr()
            async with H2Client(fender.data_port) as client:
                fine = await client.response(
                    client.request("/ok", authority="api.example", headers=[(b"x-request-id", b"h2-ok")])
                )
                slow = await client.response(client.request("/slow", authority="api.example"))
                other = await client.response(client.request("/ok", authority="other.example"))
            gate.set()
            lines = [
                json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
            ]
            async with httpx.AsyncClient() as admin:
                text = (await admin.get(f"{fender.admin_url}/metrics")).text
    finally:
        for handler_ in list(access.handlers):
            access.removeHandler(handler_)
        handlers, access.propagate, level = saved
        for handler_ in handlers:
            access.addHandler(handler_)
        access.setLevel(level)
    assert (fine.status, fine.body) == (200, b"fine")
    assert b"fender-trace" in fine.headers
    assert (slow.status, slow.headers[b"x-fender-error"]) == (504, b"timeout")
    assert (other.status, other.headers[b"x-fender-error"]) == (404, b"no_route")
    assert [r.header(b"host") for r in up.requests] == [b"api.example", b"api.example"]
    assert [(r["request_id"], r["status"], r["route"]) for r in lines[:1]] == [("h2-ok", 200, "api")]
    assert [r["status"] for r in lines] == [200, 504]
    assert 'fender_requests_total{method="GET",route="api",status_class="2xx"} 1.0' in text
    assert 'fender_requests_total{method="GET",route="api",status_class="5xx"} 1.0' in text


async def test_head_limits_per_stream(start_fender, echo_upstream):
    """server.max_header_count and headers_with_underscores (reject) answer a stream as they answer an
    HTTP/1.1 request (431, 400), and the connection goes on."""
    server = "max_header_count: 5\nheaders_with_underscores: reject\n"
    fender = await start_fender(policy_text(echo_upstream.port, server=server))
    async with H2Client(fender.data_port) as client:
        many = await client.response(client.request("/many", headers=[(b"x-%d" % i, b"v") for i in range(8)]))
        underscore = await client.response(client.request("/u", headers=[(b"x_forwarded_for", b"1.2.3.4")]))
        fine = await client.response(client.request("/fine"))
    assert (many.status, many.headers[b"x-fender-error"]) == (431, b"header_too_large")
    assert (underscore.status, underscore.headers[b"x-fender-error"]) == (400, b"underscore_header")
    assert fine.status == 200
    assert [r["path"] for r in echo_upstream.requests] == ["/fine"]


def test_the_frames_after_the_preface_are_found_however_the_preface_was_split():
    # llhttp stops on the read that brings the preface's last byte; that read may start
    # anywhere in the preface (seen on uvloop, which hands over each piece as it arrives).
    import httptools

    from proxy.server.http2 import PREFACE, after_preface

    frames = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame
    stream = PREFACE + frames
    for cut in range(len(PREFACE)):
        parser = httptools.HttpRequestParser(object())
        if cut:
            parser.feed_data(stream[:cut])  # accepted: still a request head or its "SM" tail
        with pytest.raises(httptools.HttpParserError):
            parser.feed_data(stream[cut:])
        assert after_preface(stream[cut:]) == frames, cut
    assert after_preface(b"GET / HTTP/1.1\r\n\r\n") is None
