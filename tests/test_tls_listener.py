"""HTTPS on Fender's listeners (server.tls, admin_tls): real clients (curl --cacert, openssl
s_client, Python's ssl), client certificates, live rotation of the pair while a client keeps its
connection, a bad new pair refused, plain HTTP on the TLS port, a reload that breaks a path."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import textwrap
from pathlib import Path

import httpx
import pytest

from proxy.cli import main
from proxy.config import parse_policy
from proxy.server.fender import Fender, bind_socket
from tests.support.certs import Certs, Pair, copy_file, live_pair, replace_file
from tests.support.launch import launch_fender
from tests.support.need import missing
from tests.support.procs import LeakCheck, wait_until
from tests.support.raw_upstream import RawUpstream, Request, Responder


@pytest.fixture
def certs(tmp_path) -> Certs:
    return Certs(tmp_path / "certs")


async def headers_back(req: Request, conn: Responder) -> None:
    """Answers with the request's X-Forwarded-Proto."""
    proto = dict(req.headers).get(b"x-forwarded-proto", b"-")
    await conn.send(200, body=b"proto=" + proto)


def policy(port: int, tls: str, extra: str = "") -> str:
    return (
        textwrap.dedent(
            f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        server:
          access_log: true
          header_timeout: 2s
          tls: {tls}
        upstreams:
          app:
            replicas: [{{url: "http://127.0.0.1:{port}"}}]
        routes:
          - {{name: all, upstream: app}}
        """
        )
        + extra
    )


def tls_block(pair: Pair, extra: str = "") -> str:
    return f"{{cert_file: {pair.cert}, key_file: {pair.key}{extra}}}"


class TLSClient:
    """One kept-alive HTTPS connection (asyncio streams), for requests one after another."""

    def __init__(self, port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        self.port, self.ctx, self.name = port, ctx, server_hostname

    async def __aenter__(self) -> TLSClient:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.ctx, server_hostname=self.name
        )
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass

    def peer_der(self) -> bytes:
        return self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)

    async def get(self, path: str = "/x") -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        async with asyncio.timeout(5):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await self.reader.readexactly(length)
        return int(head.split(b" ", 2)[1]), body


def der_of(pair: Pair) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(pair.cert).read_text())


async def test_curl_with_cacert_speaks_https_and_the_upstream_sees_x_forwarded_proto_https(
    start_fender, certs
):
    curl = shutil.which("curl")
    if curl is None:
        missing("curl not installed: apt-get install -y curl")
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(certs.server)))
        proc = await asyncio.create_subprocess_exec(
            curl,
            "-sS",
            "--cacert",
            certs.ca_file,
            f"https://localhost:{fender.data_port}/x",
            "-o",
            "-",
            "-w",
            " %{http_code} %{ssl_verify_result}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    assert out == b"proto=https 200 0"


def _get_with_session(port: int, ctx: ssl.SSLContext, session) -> tuple[bytes, str, bool, ssl.SSLSession]:
    """One request on a new blocking TLS connection offering ``session`` (asyncio offers none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as conn:
            conn.sendall(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):  # bounded by Fender's close and the timeout
                answer += chunk
            return answer, conn.version() or "", conn.session_reused, conn.session


@pytest.mark.parametrize(
    ("version", "name"), [(ssl.TLSVersion.TLSv1_3, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")]
)
async def test_a_new_connection_resumes_the_session_of_the_previous_one(start_fender, certs, version, name):
    # TLS 1.3's session tickets leave with the first response (not in a write of their own), TLS
    # 1.2's with the server's Finished: either way the next connection resumes, and is served.
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(certs.server)))
        ctx = certs.client_context(minimum_version=version, maximum_version=version)
        session, reused = None, []
        for _ in range(3):
            answer, got, resumed, session = await asyncio.to_thread(
                _get_with_session, fender.data_port, ctx, session
            )
            assert got == name
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"proto=https")
            reused.append(resumed)
    assert reused == [False, True, True]


@pytest.mark.parametrize(("flag", "version"), [("--http2", b"2"), ("--http1.1", b"1.1")])
async def test_the_tls_listener_offers_h2_by_alpn_and_http1_to_clients_that_want_it(
    start_fender, certs, flag, version
):
    # ALPN on the real TLS listener: h2 first when server.http2 is on (the default), http/1.1 kept.
    curl = shutil.which("curl")
    if curl is None:
        missing("curl not installed: apt-get install -y curl")
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(certs.server)))
        proc = await asyncio.create_subprocess_exec(
            curl, "-sS", flag, "--cacert", certs.ca_file, f"https://localhost:{fender.data_port}/x",
            "-o", "-", "-w", " %{http_code} %{http_version}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    assert out == b"proto=https 200 " + version


async def test_openssl_s_client_verifies_the_chain_and_gets_an_answer(start_fender, certs):
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl not installed: apt-get install -y openssl")
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(certs.server)))
        proc = await asyncio.create_subprocess_exec(
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{fender.data_port}",
            "-servername",
            "localhost",
            "-CAfile",
            certs.ca_file,
            "-verify_return_error",
            "-ign_eof",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        request = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        out, err = await asyncio.wait_for(proc.communicate(request), 20)
    assert proc.returncode == 0, err
    assert b"Verify return code: 0 (ok)" in out
    assert b"HTTP/1.1 200 OK" in out and b"proto=https" in out


async def test_client_certificates_required_verified_and_shown_in_the_access_log(start_fender, certs, caplog):
    caplog.set_level(logging.INFO, "fender.access")
    extra = f", client_ca_file: {certs.ca_file}, client_auth: require"
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(certs.server, extra)))
        async with TLSClient(fender.data_port, certs.client_context(certs.client)) as client:
            assert await client.get() == (200, b"proto=https")
        # Without a client certificate: the handshake is refused (TLS 1.3 says so on the first read).
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            async with TLSClient(fender.data_port, certs.client_context()) as client:
                await client.get()
        counter = fender.metrics.registry.get_sample_value
        await wait_until(
            lambda: (
                counter("fender_tls_handshake_errors_total", {"listener": "proxy", "reason": "client_cert"})
                == 1
            ),
            what="the refused handshake counted",
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "fender.access"]
    assert len(lines) == 1 and "tls=TLSv1.3" in lines[0] and 'client_cert="' in lines[0], lines
    assert "commonName=client.test" in lines[0], lines


async def test_optional_client_certificate_lets_clients_without_one_in(start_fender, certs, caplog):
    caplog.set_level(logging.INFO, "fender.access")
    extra = f", client_ca_file: {certs.ca_file}, client_auth: optional"
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(certs.server, extra)))
        async with TLSClient(fender.data_port, certs.client_context()) as client:
            assert await client.get() == (200, b"proto=https")
    lines = [r.getMessage() for r in caplog.records if r.name == "fender.access"]
    assert len(lines) == 1 and lines[0].endswith("client_cert=-"), lines


@pytest.mark.parametrize("how", ["atomic-rename", "in-place"])
async def test_rotation_while_a_client_keeps_its_connection(start_fender, certs, tmp_path, how):
    live = live_pair(certs.server, tmp_path)
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(live, ", watch_interval: 50ms")))
        async with TLSClient(fender.data_port, certs.client_context()) as old_client:
            assert await old_client.get() == (200, b"proto=https")
            assert old_client.peer_der() == der_of(certs.server)
            new = certs.issue("renewed", "localhost", "127.0.0.1")
            if how == "atomic-rename":
                # As Kubernetes updates a mounted Secret: new files, renamed over the old ones.
                replace_file(new.key, live.key)
                replace_file(new.cert, live.cert)
            else:
                copy_file(new.key, live.key)
                copy_file(new.cert, live.cert)
            await wait_until(lambda: fender.tls.rotations >= 1, what="the new pair taken")
            async with TLSClient(fender.data_port, certs.client_context()) as new_client:
                assert await new_client.get() == (200, b"proto=https")
                assert new_client.peer_der() == der_of(new)
            # The established connection carries on with its own session.
            assert await old_client.get() == (200, b"proto=https")
    reloads = fender.metrics.registry.get_sample_value(
        "fender_tls_certificate_reloads_total", {"listener": "proxy", "result": "applied"}
    )
    assert reloads >= 1


async def test_a_bad_new_pair_is_refused_and_the_old_one_stays(start_fender, certs, tmp_path, caplog):
    caplog.set_level(logging.ERROR, "fender.tls")
    live = live_pair(certs.server, tmp_path)
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(live, ", watch_interval: 50ms")))
        other = certs.issue("other", "localhost")
        copy_file(other.cert, live.cert)  # a certificate whose key is not key_file
        counter = fender.metrics.registry.get_sample_value
        await wait_until(
            lambda: (
                counter("fender_tls_certificate_reloads_total", {"listener": "proxy", "result": "refused"})
                == 1
            ),
            what="the mismatched pair refused",
        )
        async with TLSClient(fender.data_port, certs.client_context()) as client:
            assert await client.get() == (200, b"proto=https")
            assert client.peer_der() == der_of(certs.server)
    lines = [r.getMessage() for r in caplog.records if r.name == "fender.tls"]
    assert len(lines) == 1 and "is not the key of" in lines[0] and "previous pair stays" in lines[0], lines


async def test_plain_http_on_the_tls_port_gets_a_clear_400_then_a_close(start_fender, certs):
    async with RawUpstream(headers_back) as up:
        fender = await start_fender(policy(up.port, tls_block(certs.server)))
        reader, writer = await asyncio.open_connection("127.0.0.1", fender.data_port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()  # to EOF: the connection is closed after the answer
        writer.close()
        assert up.requests == []
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close" in head
    assert body == b"fender: plain HTTP request sent to the HTTPS port (use https://)\n"
    plain = fender.metrics.registry.get_sample_value(
        "fender_tls_handshake_errors_total", {"listener": "proxy", "reason": "plain_http"}
    )
    assert plain == 1


async def test_admin_tls_serves_the_admin_listener_over_https(start_fender, certs):
    async with RawUpstream(headers_back) as up:
        text = policy(up.port, tls_block(certs.server)) + f"admin_tls: {tls_block(certs.server)}\n"
        fender = await start_fender(text)
        async with httpx.AsyncClient(verify=certs.client_context()) as client:
            health = await client.get(f"https://localhost:{fender.admin_port}/healthz")
            metrics = await client.get(f"https://localhost:{fender.admin_port}/metrics")
    assert health.status_code == 200 and metrics.status_code == 200
    assert "fender_tls_handshake_errors_total" in metrics.text


async def test_a_reload_that_breaks_the_listener_key_path_keeps_the_old_settings(certs, tmp_path):
    path = tmp_path / "policy.yaml"
    async with RawUpstream(headers_back) as up:
        good = policy(up.port, tls_block(certs.server))
        path.write_text(good)
        fender = Fender(parse_policy(good, str(path)), str(path))
        await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
        try:
            gone = tmp_path / "nowhere" / "tls.key"
            path.write_text(policy(up.port, f"{{cert_file: {certs.server.cert}, key_file: {gone}}}"))
            attempt = await fender.reloader.reload("api")
            async with TLSClient(fender.data_port, certs.client_context()) as client:
                still = await client.get()
        finally:
            await fender.stop()
    assert attempt.result == "failed"
    (error,) = attempt.errors
    assert error.startswith(f"{path}:7:") and f"server.tls.key_file {gone}: cannot read it" in error, error
    assert still == (200, b"proto=https")


def test_validate_env_and_run_name_an_unusable_certificate_file_at_its_line(
    certs, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("proxy.cli._configure_logging", lambda level: None)  # leave the test's logging be
    path = tmp_path / "policy.yaml"
    gone = tmp_path / "missing.key"
    path.write_text(policy(9, f"{{cert_file: {certs.server.cert}, key_file: {gone}}}"))
    assert main(["validate", "--env", str(path)]) == 1
    said = capsys.readouterr().err
    assert f"{path}:7:" in said and f"server.tls.key_file {gone}: cannot read it" in said, said
    assert main(["run", str(path)]) == 2
    said = capsys.readouterr().err
    assert said.strip() == f"fender: server.tls.key_file {gone}: cannot read it (no such file or directory)"


async def test_stopping_a_tls_listener_leaves_no_socket_or_task(certs):
    leak = LeakCheck()
    async with RawUpstream(headers_back) as up:
        fender = await launch_fender(policy(up.port, tls_block(certs.server)))
        stalled = await asyncio.open_connection("127.0.0.1", fender.data_port)  # a handshake never begun
        async with TLSClient(fender.data_port, certs.client_context()) as client:
            assert await client.get() == (200, b"proto=https")
            await fender.stop()
        stalled[1].close()
    await leak.assert_back()
