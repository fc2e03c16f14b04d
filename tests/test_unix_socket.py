"""Unix-socket replicas (issue 17): `url: unix:///run/app/gunicorn.sock`.

Real servers on sockets in a tmp dir: RawUpstream (in-process) for load, Host and health checks, and a
uvicorn subprocess (an application server as gunicorn would be) killed mid-request.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap

import httpx
import pytest

from proxy.config import parse_policy
from proxy.config.loader import PolicyError
from proxy.upstream import ConnectFailure, UpstreamPool
from tests.conftest import free_port
from tests.support.health import SteppingClock, settle, step
from tests.support.metrics import metric_value
from tests.support.picker import build
from tests.support.procs import start_fender_process
from tests.support.raw_upstream import RawUpstream, Request, Responder, ok, status


@pytest.fixture
def sockets(tmp_path_factory):
    """A short directory for socket files (sun_path is 108 bytes; pytest's tmp paths can be long)."""
    base = tmp_path_factory.getbasetemp()
    path = base / "s"
    path.mkdir(exist_ok=True)
    if len(str(path)) > 80:
        pytest.fail(f"temp dir {path} too long for socket paths")
    return path


def unix_policy(upstreams: dict[str, str], routes: str) -> str:
    """listen/admin on loopback, one upstream per name with a single unix replica, and ``routes``."""
    lines = ["listen: 127.0.0.1:0", "admin: 127.0.0.1:0", "upstreams:"]
    for name, path in upstreams.items():
        lines += [f"  {name}:", f"    replicas: [{{url: 'unix://{path}'}}]"]
    return "\n".join(lines) + "\nroutes:\n" + textwrap.indent(textwrap.dedent(routes), "  ")


async def echo_target_and_host(req: Request, conn: Responder) -> None:
    body = req.target + b" " + (req.header("host") or b"-")
    await conn.send(200, [], body)


# --------------------------------------------------------------------------- configuration


def replica_of(url: str):
    text = f"upstreams:\n  app:\n    replicas:\n      - url: {url}\nroutes: [{{name: r, upstream: app}}]\n"
    return parse_policy(text, "policy.yaml").upstreams["app"].replicas[0]


def url_problem(url: str) -> str:
    with pytest.raises(PolicyError) as caught:
        replica_of(url)
    return str(caught.value)


def test_unix_urls_parse_and_bad_ones_are_refused_at_their_line() -> None:
    replica = replica_of("unix:///run/app/gunicorn.sock")
    assert (replica.unix_path, replica.name, replica.authority) == (
        "/run/app/gunicorn.sock",
        "unix:/run/app/gunicorn.sock",
        "localhost",
    )
    assert (replica.host, replica.port) == ("", 0)
    assert replica_of("http://127.0.0.1:9001").unix_path is None

    where = "policy.yaml:4:14: upstreams.app.replicas[0].url: "
    assert (
        url_problem("unix://")
        == where + '"unix://" has no socket path (write it like unix:///run/app/gunicorn.sock)'
    )
    assert (
        url_problem("unix:///")
        == where + '"unix:///" has no socket path (write it like unix:///run/app/gunicorn.sock)'
    )
    assert url_problem("unix://run/app.sock") == where + (
        "\"unix://run/app.sock\": the socket path 'run/app.sock' is relative; give an absolute path after "
        "unix:// (three slashes in all: unix:///run/app.sock)"
    )
    assert url_problem("unix:/run/app.sock") == where + (
        '"unix:/run/app.sock": a unix socket URL starts with unix:// and an absolute path '
        "(write unix:///run/app.sock)"
    )
    assert "names a directory" in url_problem("unix:///run/app/")
    assert "cannot have a query or fragment" in url_problem("unix:///run/app.sock?x=1")
    assert "the system allows at most 107" in url_problem("unix:///" + "d" * 120)


def test_two_replicas_on_one_socket_are_refused_and_rewrite_host_takes_a_name() -> None:
    one = "upstreams:\n  app:\n    replicas:\n      - url: unix:///run/app.sock\n"
    route = "routes: [{name: r, upstream: app, rewrite_host: %s}]\n"
    with pytest.raises(PolicyError, match=r"policy.yaml:5:14: .*replica unix:/run/app.sock is listed twice"):
        parse_policy(one + "      - url: unix:///run/app.sock\n" + route % "true", "policy.yaml")
    assert parse_policy(one + route % "App.Internal:8000").routes[0].rewrite_host == "app.internal:8000"
    with pytest.raises(
        PolicyError, match=r"policy.yaml:5:49: routes\[0\].rewrite_host: .*not a valid host name"
    ):
        parse_policy(one + route % '"no such!"', "policy.yaml")
    with pytest.raises(PolicyError, match="write true or false without quotes"):
        parse_policy(one + route % '"true"', "policy.yaml")


# --------------------------------------------------------------------------- data path


async def test_unix_replica_under_concurrent_load_keeps_every_body_and_the_clients_host(
    sockets, start_fender
) -> None:
    path = sockets / "load.sock"
    async with RawUpstream(echo_target_and_host, unix_path=str(path)) as up:
        fender = await start_fender(unix_policy({"app": path}, "- {name: all, upstream: app}\n"))
        host = fender.url.removeprefix("http://")
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)
        async with httpx.AsyncClient(base_url=fender.url, limits=limits, timeout=10) as client:

            async def one_client(c: int) -> list[tuple[int, str, str]]:
                out = []
                for i in range(10):
                    r = await client.get(f"/c{c}/r{i}")
                    out.append((r.status_code, r.text, f"/c{c}/r{i} {host}"))
                return out

            results = [
                x for batch in await asyncio.gather(*(one_client(c) for c in range(20))) for x in batch
            ]
            metrics = (await client.get(fender.admin_url + "/metrics")).text
            routes = (await client.get(fender.admin_url + "/admin/routes")).json()
    assert len(results) == 200
    assert [(code, text) for code, text, _ in results] == [(200, want) for _, _, want in results]
    assert len(up.requests) == 200 and up.errors == []
    # Forwarding headers describe the client side, whatever the replica's address family.
    forwarded = {(r.header("x-forwarded-for"), r.header("x-forwarded-host")) for r in up.requests}
    assert forwarded == {(b"127.0.0.1", host.encode())}
    assert up.connections <= 20  # kept alive and reused, never more than the client concurrency
    name = f"unix:{path}"
    assert metric_value(metrics, "fender_upstream_requests_total", replica=name, outcome="2xx") == 200
    assert routes["routes"][0]["replicas"][0]["name"] == name


async def test_rewrite_host_on_a_unix_replica_sends_localhost_or_the_name_given(
    sockets, start_fender
) -> None:
    path = sockets / "host.sock"
    async with RawUpstream(echo_target_and_host, unix_path=str(path)) as up:
        routes = """
        - {name: named, match: {path_prefix: /named}, upstream: app, rewrite_host: "app.internal:8000"}
        - {name: rewrite, match: {path_prefix: /rewrite}, upstream: app, rewrite_host: true}
        - {name: client, upstream: app}
        """
        fender = await start_fender(unix_policy({"app": path}, routes))
        async with httpx.AsyncClient(base_url=fender.url, headers={"host": "shop.example"}) as client:
            answers = [(await client.get(p)).text for p in ("/named", "/rewrite", "/plain")]
    assert answers == ["/named app.internal:8000", "/rewrite localhost", "/plain shop.example"]
    assert up.errors == []


async def test_missing_socket_file_is_502_connect_failure_naming_the_path(sockets, start_fender) -> None:
    path = sockets / "absent.sock"
    fender = await start_fender(unix_policy({"app": path}, "- {name: all, upstream: app}\n"))
    async with httpx.AsyncClient(base_url=fender.url) as client:
        r = await client.get("/")
        again = await client.get("/")  # Fender and the client connection are fine
    assert (r.status_code, r.headers["x-fender-error"]) == (502, "connect_failure")
    assert (again.status_code, again.headers["x-fender-error"]) == (502, "connect_failure")
    pool = UpstreamPool("", 0, unix_path=str(path), connect_timeout=1.0)
    try:
        with pytest.raises(ConnectFailure, match=f"connect to unix:{path} failed: .*No such file"):
            await pool.request(b"GET", b"/", [(b"host", b"x")])
    finally:
        await pool.close()


async def test_a_cut_upload_aborts_the_unix_connection_and_the_next_request_opens_a_new_one(sockets) -> None:
    """The SO_LINGER-0 abort (a request body cut short) works on a unix socket as on TCP."""
    path = sockets / "upload.sock"

    async def body_stream() -> bytes:
        return b"u" * 65536  # endless: only the early response stops it

    async def refuse(req: Request, conn: Responder) -> None:
        await conn.send(413, (), b"no")
        await conn.hang()  # stops reading: the client blocks on drain until the head wakes it

    async with RawUpstream(refuse, stream_request_body=True, unix_path=str(path)) as up:
        pool = UpstreamPool("", 0, unix_path=str(path))
        try:
            resp = await pool.request(b"POST", b"/", [(b"host", b"x")], body_stream=body_stream)
            assert (resp.status, await resp.read()) == (413, b"no")
            assert (pool.in_use, pool.idle, pool.pending) == (0, 0, 0)  # aborted, never pooled
            again = await pool.request(b"GET", b"/", [(b"host", b"x")])
            assert again.status == 413 and up.connections == 2 and pool.connections_opened == 2
        finally:
            await pool.close()


APP = """
import asyncio, sys
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first-part", "more_body": True})
        await asyncio.Event().wait()  # the rest never comes: the process is killed
    elif path == "/held":
        print("held", flush=True)  # the test learns the request arrived
        await asyncio.Event().wait()
    else:
        body = b"app " + path.encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

uvicorn.run(app, uds=sys.argv[1], lifespan="off", log_level="warning", access_log=False)
"""


async def start_app(path) -> asyncio.subprocess.Process:
    """uvicorn serving APP on the unix socket ``path``; returns once it accepts connections."""
    if path.exists():
        path.unlink()  # the stale file a killed server leaves behind
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", APP, str(path), stdout=asyncio.subprocess.PIPE
    )
    for _ in range(200):  # bounded: 10 s
        try:
            _, writer = await asyncio.open_unix_connection(str(path))
        except OSError:
            await asyncio.sleep(0.05)  # polling the socket file until the server listens
            continue
        writer.close()
        return proc
    proc.kill()
    raise AssertionError("uvicorn did not start on the unix socket")


async def test_app_server_killed_mid_request_cuts_only_its_requests(sockets, start_fender) -> None:
    app_path, side_path = sockets / "app.sock", sockets / "side.sock"
    proc = await start_app(app_path)
    try:
        async with RawUpstream(ok(b"side"), unix_path=str(side_path)) as side:
            routes = """
            - {name: side, match: {path_prefix: /side}, upstream: side}
            - {name: app, upstream: app}
            """
            fender = await start_fender(unix_policy({"app": app_path, "side": side_path}, routes))
            async with (
                httpx.AsyncClient(base_url=fender.url, timeout=10) as client,
                httpx.AsyncClient(base_url=fender.url, timeout=10) as bystander,
            ):
                assert (await client.get("/hello")).text == "app /hello"
                assert (await bystander.get("/side")).text == "side"
                async with client.stream("GET", "/stream") as streaming:
                    assert streaming.status_code == 200
                    pieces = streaming.aiter_raw()
                    assert await anext(pieces) == b"first-part"
                    held = asyncio.ensure_future(client.get("/held"))
                    async with asyncio.timeout(10):
                        assert await proc.stdout.readline() == b"held\n"
                    proc.send_signal(signal.SIGKILL)  # the application server dies with both in flight
                    await proc.wait()
                    with pytest.raises(httpx.RemoteProtocolError):
                        async for _ in pieces:
                            pass
                cut = await held
                assert (cut.status_code, cut.headers["x-fender-error"]) == (502, "reset")
                # The socket file is still there with nobody listening: refused, a connect failure.
                refused = await client.get("/hello")
                assert (refused.status_code, refused.headers["x-fender-error"]) == (502, "connect_failure")
                # Another upstream's traffic, on a client connection kept open all along, never noticed.
                for _ in range(3):
                    assert (await bystander.get("/side")).text == "side"
                assert side.connections == 1
                proc = await start_app(app_path)  # restarted: served again, no dead connection reused
                assert (await client.get("/again")).text == "app /again"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --------------------------------------------------------------------------- health checks


async def test_health_check_over_the_socket_takes_the_replica_down_and_back(sockets) -> None:
    path = sockets / "health.sock"
    async with RawUpstream(ok(b"up"), unix_path=str(path)) as app:
        up, clock = build(
            f"""
            replicas: [{{url: 'unix://{path}'}}]
            health_check: {{path: /healthz, interval: 1s, timeout: 300ms, jitter: 0%, healthy_threshold: 2, unhealthy_threshold: 2}}
            panic_threshold: 0%
            """,
            SteppingClock(),
        )
        await up.start()
        try:
            await settle(up, clock)
            state = up.picker.state_of(f"unix:{path}")
            await step(up, clock)
            assert state.last_result == "pass" and state.active_healthy
            app.handler = status(503)
            await step(up, clock)
            await step(up, clock)
            assert state.last_result == "fail" and not state.active_healthy
            assert up.choose(None) is None  # down: no replica takes traffic
            app.handler = ok(b"back")
            await step(up, clock)
            await step(up, clock)
            assert state.active_healthy and up.choose(None).name == f"unix:{path}"
            assert {r.target for r in app.requests} == {b"/healthz"}
            assert {r.header("host") for r in app.requests} == {b"localhost"}
        finally:
            await up.close()


async def test_a_unix_replica_can_be_drained_through_the_admin_api(sockets, start_fender) -> None:
    path = sockets / "drain.sock"
    async with RawUpstream(ok(b"up"), unix_path=str(path)):
        fender = await start_fender(unix_policy({"app": path}, "- {name: all, upstream: app}\n"))
        name = f"unix:{path}"
        async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
            # Either spelling: the replica's name as it is, or percent-encoded as the status page sends it.
            drained = await admin.post(f"/admin/upstreams/app/replicas/{name}/drain")
            encoded = name.replace("/", "%2F")
            undrained = await admin.post(f"/admin/upstreams/app/replicas/{encoded}/undrain")
            ready = (await admin.get("/readyz")).json()
    assert drained.status_code == 200 and drained.json()["replicas"][0]["drained"] is True
    assert undrained.status_code == 200 and undrained.json()["replicas"][0]["drained"] is False
    assert ready["upstreams"]["app"]["replicas"] == {name: "reachable"}


async def test_fender_run_on_uvloop_proxies_to_a_unix_replica(sockets, fender_process) -> None:
    path = sockets / "run.sock"
    port = free_port()
    async with RawUpstream(echo_target_and_host, unix_path=str(path)) as up:
        text = unix_policy({"app": path}, "- {name: all, upstream: app}\n").replace(
            "listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}"
        )
        await asyncio.to_thread(start_fender_process, fender_process, text, port)
        limits = httpx.Limits(max_connections=10)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=10
        ) as client:
            answers = await asyncio.gather(
                *(client.get(f"/n{i}", headers={"host": "svc"}) for i in range(50))
            )
    assert [(r.status_code, r.text) for r in answers] == [(200, f"/n{i} svc") for i in range(50)]
    assert len(up.requests) == 50 and up.connections <= 10


async def test_outlier_detection_ejects_a_failing_unix_replica(sockets, start_fender) -> None:
    bad_path, good_path = sockets / "bad.sock", sockets / "good.sock"
    async with (
        RawUpstream(status(500, b"bad"), unix_path=str(bad_path)) as bad,
        RawUpstream(ok(b"good"), unix_path=str(good_path)),
    ):
        text = textwrap.dedent(
            f"""\
            listen: 127.0.0.1:0
            admin: 127.0.0.1:0
            upstreams:
              app:
                replicas: [{{url: 'unix://{bad_path}'}}, {{url: 'unix://{good_path}'}}]
                outlier_detection: {{consecutive_failures: 2, ejection_time: 60s}}
            routes:
              - {{name: all, upstream: app}}
            """
        )
        fender = await start_fender(text)
        async with httpx.AsyncClient(base_url=fender.url) as client:
            # Round robin: the bad replica answers every other request until its second 500 ejects it.
            first = [(await client.get("/")).text for _ in range(4)]
            after = [(await client.get("/")).text for _ in range(6)]
            view = (await client.get(fender.admin_url + "/admin/upstreams")).json()
    assert first.count("bad") == 2 and after == ["good"] * 6
    assert len(bad.requests) == 2
    states = {r["name"]: r["state"] for r in view["upstreams"]["app"]["replicas"]}
    assert states == {f"unix:{bad_path}": "ejected", f"unix:{good_path}": "healthy"}
