"""TLS to upstreams: https:// replicas served by Python's ssl module on loopback, with certificates
the tests make (tests/support/certs.py). Verification passes; each failure kind is a 502
tls_failure with its cause in the error log and the metric; mutual TLS; retries, health checks,
session reuse, rotation of the files on disk and a reload that breaks a path."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import textwrap

import httpx
import pytest

from proxy.config import PolicyError, parse_policy
from proxy.options.tls import UpstreamTLSOptions
from proxy.server.fender import Fender, bind_socket
from proxy.upstream import UpstreamPool
from proxy.upstream.tls import UpstreamTLS
from tests.conftest import free_port
from tests.support.certs import Certs, replace_file
from tests.support.need import missing
from tests.support.procs import wait_until
from tests.support.raw_upstream import RawUpstream, Request, Responder, ok, raw


@pytest.fixture
def certs(tmp_path) -> Certs:
    return Certs(tmp_path / "certs")


def policy(url: str, tls: str = "", extra_upstream: str = "", routes: str = "") -> str:
    tls_line = f"    tls: {tls}\n" if tls else ""
    return (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nreload: {watch: false}\n"
        f'upstreams:\n  api:\n    replicas: [{{url: "{url}"}}]\n{tls_line}{extra_upstream}'
        + (routes or "routes:\n  - {name: all, upstream: api, timeout: 3s}\n")
    )


def errors(fender, reason: str = "tls_failure") -> float:
    value = fender.metrics.registry.get_sample_value(
        "fender_upstream_errors_total", {"upstream": "api", "reason": reason}
    )
    return value or 0.0


def fault_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fender.upstream"]


async def test_https_replica_is_verified_and_keep_alive_makes_handshakes_rare(start_fender, certs):
    ctx = certs.server.server_context()
    async with RawUpstream(ok(b"secure"), ssl=ctx) as up:
        fender = await start_fender(policy(f"https://127.0.0.1:{up.port}", f"{{ca_file: {certs.ca_file}}}"))
        async with httpx.AsyncClient() as client:
            for _ in range(50):
                response = await client.get(fender.url + "/x")
                assert response.status_code == 200 and response.text == "secure"
        pool = fender.runtime.upstreams["api"].replicas[0].pool
        # 50 requests in a row on keep-alive: one connection, one handshake.
        assert (pool.connections_opened, pool.tls_handshakes, up.connections) == (1, 1, 1)
        assert len(up.requests) == 50


async def test_server_name_sets_sni_and_the_name_verified(start_fender, certs):
    named = certs.issue("named", "api.payments.test")
    seen: list[str | None] = []
    ctx = named.server_context()
    ctx.sni_callback = lambda sslobj, name, _ctx: seen.append(name)
    async with RawUpstream(ok(), ssl=ctx) as up:
        tls = f"{{ca_file: {certs.ca_file}, server_name: api.payments.test}}"
        fender = await start_fender(policy(f"https://127.0.0.1:{up.port}", tls))
        async with httpx.AsyncClient() as client:
            assert (await client.get(fender.url + "/x")).status_code == 200
    assert seen == ["api.payments.test"]


def _wrong_name(certs: Certs):
    return certs.issue("other", "other.test").server_context()


def _expired(certs: Certs):
    return certs.expired().server_context()


def _other_ca(certs: Certs):
    leaf = certs.other_ca().issue_cert("localhost", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    return ctx


def _tls12_only(certs: Certs):
    return certs.server.server_context(maximum_version=ssl.TLSVersion.TLSv1_2)


@pytest.mark.parametrize(
    "make_server,tls_extra,cause",
    [
        (_expired, "", "the replica's certificate has expired"),
        (_other_ca, "", "unknown issuer"),
        (_wrong_name, "", "name mismatch: the replica's certificate is not valid for 127.0.0.1"),
        # asyncio's TLS server drops its alert and closes: that is all there is to say.
        (_tls12_only, ", min_version: TLSv1.3", "the replica closed the connection during the TLS handshake"),
    ],
    ids=["expired", "unknown-issuer", "name-mismatch", "no-common-version"],
)
async def test_each_tls_failure_is_a_502_tls_failure_with_its_cause(
    start_fender, certs, caplog, make_server, tls_extra, cause
):
    caplog.set_level(logging.WARNING, "fender.upstream")
    async with RawUpstream(ok(), ssl=make_server(certs), expect_errors=True) as up:
        tls = f"{{ca_file: {certs.ca_file}{tls_extra}}}"
        fender = await start_fender(policy(f"https://127.0.0.1:{up.port}", tls))
        async with httpx.AsyncClient() as client:
            response = await client.get(fender.url + "/x")
        assert response.status_code == 502
        assert response.headers["x-fender-error"] == "tls_failure"
        assert errors(fender) == 1
        assert up.requests == []  # nothing of the request reached the replica
    lines = fault_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("upstream fault tls_failure: ") and cause in lines[0], (
        lines
    )


class PlaintextServer:
    """Answers anything with a plaintext 400, as Python's http.server answers a ClientHello."""

    async def __aenter__(self):
        async def answer(reader, writer):
            await reader.read(1024)
            writer.write(b"HTTP/1.0 400 Bad request version\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(answer, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_a_plaintext_server_on_an_https_replica_is_a_tls_failure(start_fender, caplog):
    caplog.set_level(logging.WARNING, "fender.upstream")
    async with PlaintextServer() as up:
        fender = await start_fender(policy(f"https://127.0.0.1:{up.port}"))
        async with httpx.AsyncClient() as client:
            response = await client.get(fender.url + "/x")
    assert response.status_code == 502 and response.headers["x-fender-error"] == "tls_failure"
    (line,) = fault_lines(caplog)
    assert "the replica does not speak TLS on this port (wrong version number)" in line, line


async def test_openssl_s_server_alerts_reach_the_error_log(start_fender, certs, caplog):
    """A server that sends its alert (OpenSSL's s_server, as nginx would): the precise cause."""
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl not installed: apt-get install -y openssl")
    caplog.set_level(logging.WARNING, "fender.upstream")
    port = free_port()
    command = [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", certs.server.cert]
    command += ["-key", certs.server.key, "-tls1_2", "-www", "-quiet"]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_until(lambda: _listening(port), within=10, what="openssl s_server listening")
        tls = f"{{ca_file: {certs.ca_file}, min_version: TLSv1.3}}"
        fender = await start_fender(policy(f"https://127.0.0.1:{port}", tls))
        async with httpx.AsyncClient() as client:
            response = await client.get(fender.url + "/x")
    finally:
        proc.kill()
        await proc.wait()
    assert response.status_code == 502 and response.headers["x-fender-error"] == "tls_failure"
    (line,) = fault_lines(caplog)
    assert "no TLS version both sides accept (protocol version alert" in line, line


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def test_mutual_tls_client_certificate(start_fender, certs, caplog):
    caplog.set_level(logging.WARNING, "fender.upstream")
    ctx = certs.server.server_context(verify_mode=ssl.CERT_REQUIRED)
    ctx.load_verify_locations(certs.ca_file)
    peers: list[str] = []

    async def who(req: Request, conn: Responder) -> None:
        cert = conn.transport.get_extra_info("peercert")
        peers.append(dict(rdn[0] for rdn in cert["subject"])["commonName"])
        await conn.send(200, body=b"hello client")

    async with RawUpstream(who, ssl=ctx, expect_errors=True) as up:
        url = f"https://127.0.0.1:{up.port}"
        without = await start_fender(policy(url, f"{{ca_file: {certs.ca_file}}}"))
        mutual = await start_fender(
            policy(
                url,
                f"{{ca_file: {certs.ca_file}, cert_file: {certs.client.cert}, key_file: {certs.client.key}}}",
            )
        )
        async with httpx.AsyncClient() as client:
            refused = await client.get(without.url + "/x")
            accepted = await client.get(mutual.url + "/x")
    assert refused.status_code == 502 and refused.headers["x-fender-error"] == "tls_failure"
    assert errors(without) == 1
    assert accepted.status_code == 200 and accepted.text == "hello client"
    assert peers == ["client.test"]
    assert any("client certificate" in line for line in fault_lines(caplog)), fault_lines(caplog)


async def test_tls_failure_is_a_connect_failure_for_retries_even_of_a_post(start_fender, certs):
    bad = _expired(certs)
    good = certs.server.server_context()
    async with RawUpstream(ok(b"bad"), ssl=bad, expect_errors=True) as up_bad:
        async with RawUpstream(ok(b"good"), ssl=good) as up_good:
            text = textwrap.dedent(
                f"""\
                listen: 127.0.0.1:0
                admin: 127.0.0.1:0
                upstreams:
                  api:
                    replicas:
                      - {{url: "https://127.0.0.1:{up_bad.port}"}}
                      - {{url: "https://127.0.0.1:{up_good.port}"}}
                    tls: {{ca_file: {certs.ca_file}}}
                    outlier_detection: {{consecutive_failures: 2}}
                routes:
                  - name: all
                    upstream: api
                    retry: {{attempts: 2, retry_on: [connect_failure]}}
                """
            )
            fender = await start_fender(text)
            async with httpx.AsyncClient() as client:
                answers = [(await client.post(fender.url + "/pay", content=b"{}")) for _ in range(4)]
    # A POST is only resent when nothing was sent: a failed handshake qualifies.
    assert [(a.status_code, a.text) for a in answers] == [(200, "good")] * 4
    assert up_bad.requests == []
    states = {s.replica.name: s for s in fender.runtime.upstreams["api"].picker.states}
    assert states[f"127.0.0.1:{up_bad.port}"].ejected_until > 0  # outlier detection saw it


async def test_http_replica_answering_with_a_tls_record_gets_the_hint(start_fender, caplog):
    caplog.set_level(logging.WARNING, "fender.upstream")
    alert = b"\x15\x03\x03\x00\x02\x02\x46"  # a TLS alert record, as Java and Go TLS servers answer
    async with RawUpstream(raw(alert, close=True)) as up:
        fender = await start_fender(policy(f"http://127.0.0.1:{up.port}"))
        async with httpx.AsyncClient() as client:
            response = await client.get(fender.url + "/x")
    assert response.status_code == 502
    assert any("the replica speaks TLS: use https://" in line for line in fault_lines(caplog)), fault_lines(
        caplog
    )


async def test_health_checks_use_the_upstream_tls_settings(start_fender, certs):
    health = (
        "    health_check: {interval: 100ms, timeout: 100ms, healthy_threshold: 1, unhealthy_threshold: 1}\n"
    )
    async with RawUpstream(ok(), ssl=certs.server.server_context()) as good:
        async with RawUpstream(ok(), ssl=_expired(certs), expect_errors=True) as bad:
            text = (
                textwrap.dedent(
                    f"""\
                listen: 127.0.0.1:0
                admin: 127.0.0.1:0
                upstreams:
                  api:
                    replicas:
                      - {{url: "https://127.0.0.1:{good.port}"}}
                      - {{url: "https://127.0.0.1:{bad.port}"}}
                    tls: {{ca_file: {certs.ca_file}}}
                """
                )
                + health
                + "routes:\n  - {name: all, upstream: api}\n"
            )
            fender = await start_fender(text)
            states = fender.runtime.upstreams["api"].picker.states
            await good.wait_until(lambda: len(good.requests) >= 2)
            await wait_until(
                lambda: not states[1].active_healthy, what="the replica with the expired certificate down"
            )
    assert states[0].active_healthy
    assert all(r.target == b"/healthz" for r in good.requests)
    assert bad.requests == []


async def test_new_connections_resume_the_tls_session(certs):
    ctx = certs.server.server_context()
    async with RawUpstream(ok(b"x"), ssl=ctx) as up:
        options = UpstreamTLSOptions(ca_file=certs.ca_file)
        tls = UpstreamTLS(options, "tls")
        # No keep-alive: every request opens a new connection.
        pool = UpstreamPool("127.0.0.1", up.port, max_keepalive=0, tls=tls.client("127.0.0.1"))
        for _ in range(3):
            response = await pool.request(b"GET", b"/", [(b"host", b"a")])
            assert await response.read() == b"x"
        await pool.close()
    assert pool.tls_handshakes == 3
    assert pool.tls_resumed == 2  # the second and third offered the first one's session


async def test_certificate_files_rotated_on_disk_are_used_by_new_connections(start_fender, certs, tmp_path):
    # Fender trusts a CA file that does not (yet) hold the replica's issuer.
    other = certs.other_ca()
    ca_file = tmp_path / "trust.pem"
    other.cert_pem.write_to_path(str(ca_file))
    async with RawUpstream(ok(b"rotated"), ssl=certs.server.server_context(), expect_errors=True) as up:
        tls = f"{{ca_file: {ca_file}, watch_interval: 50ms}}"
        fender = await start_fender(policy(f"https://127.0.0.1:{up.port}", tls))
        async with httpx.AsyncClient() as client:
            assert (await client.get(fender.url + "/x")).headers["x-fender-error"] == "tls_failure"
            # Rotated as cert-manager does: the new bundle replaces the file atomically.
            replace_file(certs.ca_file, str(ca_file))
            upstream_tls = fender.runtime.upstreams["api"].tls
            await wait_until(lambda: upstream_tls.generation >= 1, what="the changed CA file read")
            response = await client.get(fender.url + "/x")
    assert response.status_code == 200 and response.text == "rotated"


async def test_a_reload_that_breaks_a_certificate_path_keeps_the_running_settings(certs, tmp_path):
    path = tmp_path / "policy.yaml"
    async with RawUpstream(ok(b"still"), ssl=certs.server.server_context()) as up:
        good = policy(f"https://127.0.0.1:{up.port}", f"{{ca_file: {certs.ca_file}}}")
        path.write_text(good)
        fender = Fender(parse_policy(good, str(path)), str(path))
        await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
        try:
            missing = tmp_path / "gone" / "client.pem"
            broken = policy(
                f"https://127.0.0.1:{up.port}",
                f"{{ca_file: {certs.ca_file}, cert_file: {missing}, key_file: {certs.client.key}}}",
            )
            path.write_text(broken)
            attempt = await fender.reloader.reload("api")
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{fender.data_port}/x")
        finally:
            await fender.stop()
    assert attempt.result == "failed"
    (error,) = attempt.errors
    # FILE:LINE:COL at the line naming the file, with the path and what is wrong with it.
    assert error.startswith(f"{path}:7:") and str(missing) in error and "cannot read it" in error, error
    assert response.status_code == 200 and response.text == "still"


def test_verify_false_needs_insecure_skip_verify_and_warns_at_every_load(tmp_path):
    base = policy("https://127.0.0.1:8443", "{verify: false}")
    with pytest.raises(PolicyError) as refused:
        parse_policy(base)
    assert "insecure_skip_verify: true" in str(refused.value)
    from proxy.config.loader import read_policy

    document = read_policy(policy("https://127.0.0.1:8443", "{verify: false, insecure_skip_verify: true}"))
    assert [w.path for w in document.warnings] == ["upstreams.api.tls.verify"]
    assert "not verified" in document.warnings[0].message


def test_https_replicas_are_accepted_and_tls_without_them_is_refused():
    parsed = parse_policy(policy("https://api.payments.test"))
    replica = parsed.upstreams["api"].replicas[0]
    assert (replica.tls, replica.port) == (True, 443)
    with pytest.raises(PolicyError) as refused:
        parse_policy(policy("http://127.0.0.1:9001", "{ca_file: /etc/ca.pem}"))
    assert "tls applies to https:// replicas" in str(refused.value)
