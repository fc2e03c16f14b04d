"""The hardening catalogue's TLS cases, on Fender's HTTPS listener: a handshake that stalls is
cut at header_timeout (one, and 300 at once while a normal client sees no error), garbage in
place of a ClientHello, a renegotiation attempt (refused)."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import textwrap

import pytest

from tests.support.certs import Certs
from tests.support.need import missing
from tests.support.raw_upstream import RawUpstream, ok

# A TLS record header announcing a 512-byte ClientHello, and the first bytes of it: then nothing.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


@pytest.fixture
def certs(tmp_path) -> Certs:
    return Certs(tmp_path / "certs")


def policy(port: int, certs: Certs, header_timeout: str = "500ms") -> str:
    return textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        server:
          header_timeout: {header_timeout}
          tls: {{cert_file: {certs.server.cert}, key_file: {certs.server.key}}}
        upstreams:
          app:
            replicas: [{{url: "http://127.0.0.1:{port}"}}]
        routes:
          - {{name: all, upstream: app}}
        """
    )


def handshake_errors(fender, reason: str) -> float:
    value = fender.metrics.registry.get_sample_value(
        "fender_tls_handshake_errors_total", {"listener": "proxy", "reason": reason}
    )
    return value or 0.0


async def https_get(port: int, certs: Certs) -> int:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=certs.client_context(), server_hostname="localhost"
    )
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1])


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection (raises TimeoutError if it did not);
    a reset (closed with our bytes unread) counts as closed."""
    async with asyncio.timeout(seconds):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def test_a_handshake_that_stalls_is_cut_at_header_timeout(start_fender, certs, caplog):
    async with RawUpstream(ok()) as up:
        fender = await start_fender(policy(up.port, certs))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        writer.write(PARTIAL_HELLO)
        # Closed without a byte in answer: no HTTP 408 can be written into an unfinished handshake.
        assert await closed_within(reader, 5) == b""
        writer.close()
        assert handshake_errors(fender, "timeout") == 1
        assert await https_get(fender.data_port, certs) == 200


@pytest.mark.slow
async def test_300_stalled_handshakes_while_a_normal_client_sees_no_error(start_fender, certs, caplog):
    async with RawUpstream(ok()) as up:
        fender = await start_fender(policy(up.port, certs, header_timeout="2s"))
        stalled = []
        for _ in range(300):
            reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
            writer.write(PARTIAL_HELLO)
            stalled.append((reader, writer))
        statuses = [await https_get(fender.data_port, certs) for _ in range(30)]
        # Every stalled one is closed by the header timeout, bounded in time.
        endings = await asyncio.gather(*(closed_within(r, 10) for r, _ in stalled))
        for _, writer in stalled:
            writer.close()
    assert statuses == [200] * 30
    assert endings == [b""] * 300
    assert handshake_errors(fender, "timeout") == 300
    # Rate-limited: one line for the 300, never one per connection.
    lines = [r for r in caplog.records if r.name == "fender.tls" and "timeout" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize(
    "garbage,reason",
    [(b"\x00\x01\xff" + os.urandom(200), "not_tls"), (b"\x16\x03\x01\x00\x05" + b"\xff" * 5, "protocol")],
    ids=["not-a-tls-record", "broken-client-hello"],
)
async def test_garbage_instead_of_a_client_hello_is_closed_and_counted(start_fender, certs, garbage, reason):
    async with RawUpstream(ok()) as up:
        fender = await start_fender(policy(up.port, certs))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        writer.write(garbage)
        answer = await closed_within(reader, 5)
        writer.close()
        assert b"HTTP" not in answer  # at most a TLS alert, never an HTTP answer
        assert handshake_errors(fender, reason) == 1
        assert await https_get(fender.data_port, certs) == 200
        assert up.requests and all(r.target == b"/x" for r in up.requests)


async def test_a_renegotiation_attempt_is_refused(start_fender, certs):
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl not installed: apt-get install -y openssl")
    async with RawUpstream(ok()) as up:
        fender = await start_fender(policy(up.port, certs, header_timeout="5s"))
        proc = await asyncio.create_subprocess_exec(
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{fender.data_port}",
            "-tls1_2",  # TLS 1.3 has no renegotiation at all
            "-CAfile",
            certs.ca_file,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(b"R\n"), 20)  # R: renegotiate
        assert b"RENEGOTIATING" in err
        assert b"no renegotiation" in err  # Fender's answer: the no_renegotiation alert
        assert proc.returncode != 0
        assert await https_get(fender.data_port, certs) == 200


async def test_tls_versions_below_min_version_are_refused(start_fender, certs):
    async with RawUpstream(ok()) as up:
        text = policy(up.port, certs).replace("key_file: ", "min_version: TLSv1.3, key_file: ")
        fender = await start_fender(text)
        ctx = certs.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", fender.data_port, ssl=ctx, server_hostname="localhost")
        assert await https_get(fender.data_port, certs) == 200
    assert handshake_errors(fender, "protocol") == 1


async def test_handshakes_under_way_are_bounded_by_max_connections(start_fender, certs):
    async with RawUpstream(ok()) as up:
        text = policy(up.port, certs, header_timeout="1s").replace(
            "server:\n", "server:\n  max_connections: 5\n"
        )
        fender = await start_fender(text)
        stalled = [await asyncio.open_connection("127.0.0.1", fender.data_port) for _ in range(5)]
        for _, writer in stalled:
            writer.write(PARTIAL_HELLO)
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        writer.write(PARTIAL_HELLO)
        assert await closed_within(reader, 5) == b""  # the sixth: closed at once (counted as overload)
        writer.close()
        assert handshake_errors(fender, "overload") == 1
        assert [await closed_within(r, 5) for r, _ in stalled] == [b""] * 5
        for _, w in stalled:
            w.close()
        assert await https_get(fender.data_port, certs) == 200
