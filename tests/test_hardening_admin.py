"""Admin API hardening: loopback by default, refused beyond loopback without a token, and with a
token every /admin/* endpoint (every mutating one especially) refuses anything but
``Authorization: Bearer <token>``: no token, a wrong or altered token, the token in the query
string, a cookie, another header or another scheme, path spellings that dodge a prefix check.
Refused calls change nothing; GET never changes anything; the data port never serves the admin
API. Each test ends with Fender alive and this process's fds and tasks back to baseline.
"""

from __future__ import annotations

import base64
import json
import textwrap

import httpx
import pytest

from proxy.config import PolicyError, parse_policy
from proxy.ops.auth import AdminAuthError, resolve_admin_token
from proxy.options.base import is_loopback
from proxy.server.fender import Fender
from tests.support.launch import launch_fender
from tests.support.procs import LeakCheck, assert_fender_alive
from tests.support.raw_client import exchange
from tests.support.raw_upstream import RawUpstream, ok

TOKEN = "hardening-admin-token-0123456789abcdef"
ENV = "FENDER_HARDENING_ADMIN_TOKEN"


def policy(upstream_port: int, admin: str = "127.0.0.1:0", auth: bool = True, extra: str = "") -> str:
    text = textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        admin: "{admin}"
        reload: {{watch: false}}
        upstreams:
          echo: {{replicas: [{{url: http://127.0.0.1:{upstream_port}}}]}}
        routes:
          - name: all
            upstream: echo
            cache: {{}}
            circuit_breaker: {{consecutive_failures: 5}}
        """
    )
    return text + (f"admin_auth: {{token_env: {ENV}}}\n" if auth else "") + extra


@pytest.fixture
async def admin_fender(tmp_path, monkeypatch):
    """Start Fender from a real policy file (so reload works), admin and data on 127.0.0.1;
    at the end it must still answer, and fds/tasks must be back to baseline once stopped."""
    monkeypatch.setenv(ENV, TOKEN)
    leak = LeakCheck()
    started: list[Fender] = []

    async def start(text: str) -> Fender:
        path = tmp_path / "policy.yaml"
        path.write_text(text)
        fender = await launch_fender(text, str(path))
        started.append(fender)
        return fender

    yield start
    try:
        for fender in started:
            await assert_fender_alive(fender)
    finally:
        for fender in started:
            await fender.stop()
    await leak.assert_back()


@pytest.fixture
async def upstream():
    async with RawUpstream(ok(b"cached", headers=[(b"cache-control", b"max-age=600")])) as up:
        yield up


# --------------------------------------------------------------------------- where the admin API listens


def test_admin_listens_on_loopback_by_default():
    text = "upstreams: {echo: {replicas: [{url: http://127.0.0.1:9}]}}\nroutes: [{name: a, upstream: echo}]\n"
    default = parse_policy(text)
    assert str(default.admin.host) == "127.0.0.1" and is_loopback(str(default.admin.host))
    assert resolve_admin_token(default, {}) is None  # loopback: no token needed


@pytest.mark.parametrize(
    "admin",
    ["0.0.0.0:9901", "[::]:9901", "10.0.0.7:9901", "192.168.1.2:9901", "admin.example.com:9901"],
)
def test_admin_beyond_loopback_is_refused_without_a_token(admin):
    text = policy(9, admin=admin, auth=False)
    with pytest.raises(PolicyError, match="no admin token is configured"):
        parse_policy(text)  # refused by validation: `fender validate` says so as `run` does
    # ... and accepted once a token is configured
    with_token = parse_policy(policy(9, admin=admin))
    assert resolve_admin_token(with_token, {ENV: TOKEN}) == TOKEN


@pytest.mark.parametrize("admin", ["127.0.0.1:9901", "127.8.9.10:9901", "[::1]:9901", "localhost:9901"])
def test_loopback_spellings_need_no_token(admin):
    assert resolve_admin_token(parse_policy(policy(9, admin=admin, auth=False)), {}) is None


async def test_refused_start_binds_nothing(upstream, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)  # the token's variable is unset: start must refuse
    leak = LeakCheck()
    fender = Fender(parse_policy(policy(upstream.port, admin="0.0.0.0:0")), "")
    with pytest.raises(AdminAuthError):
        await fender.start()  # no sockets given: it would bind 0.0.0.0 if it did not refuse first
    await fender.runtime.close()
    await leak.assert_back()


# --------------------------------------------------------------------------- the token


def bad_credentials() -> list[tuple[str, dict[str, str], str]]:
    """(label, headers, query string) that must all be refused."""
    basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    return [
        ("none", {}, ""),
        ("wrong", {"authorization": "Bearer " + "x" * len(TOKEN)}, ""),
        ("prefix", {"authorization": "Bearer " + TOKEN[:-1]}, ""),
        ("longer", {"authorization": "Bearer " + TOKEN + "x"}, ""),
        ("upper", {"authorization": "Bearer " + TOKEN.upper()}, ""),
        ("empty-bearer", {"authorization": "Bearer"}, ""),
        ("no-scheme", {"authorization": TOKEN}, ""),
        ("basic", {"authorization": f"Basic {basic}"}, ""),
        ("token-scheme", {"authorization": f"Token {TOKEN}"}, ""),
        ("query-token", {}, f"token={TOKEN}"),
        ("query-access-token", {}, f"access_token={TOKEN}"),
        ("query-authorization", {}, f"authorization=Bearer%20{TOKEN}"),
        ("cookie", {"cookie": f"token={TOKEN}; authorization=Bearer {TOKEN}"}, ""),
        ("other-header", {"x-admin-token": TOKEN, "proxy-authorization": f"Bearer {TOKEN}"}, ""),
    ]


def concrete(path: str) -> str:
    return path.replace("{name}", "echo").replace("{action}", "open")


def admin_paths(fender, method: str) -> list[str]:
    return sorted(
        concrete(r.path)
        for r in fender.admin_app.routes
        if method in (r.methods or ()) and r.path.startswith("/admin/")
    )


async def fill_cache(fender) -> None:
    async with httpx.AsyncClient(base_url=fender.url, timeout=5) as client:
        for _ in range(2):
            assert (await client.get("/page")).text == "cached"


async def test_every_mutating_endpoint_refuses_anything_but_the_bearer_token(
    admin_fender, upstream, tmp_path
):
    checkpoint = tmp_path / "state.json"
    fender = await admin_fender(
        policy(upstream.port, extra=f'checkpoint: {{path: "{checkpoint}", interval: 1h}}\n')
    )
    await fill_cache(fender)
    posts = admin_paths(fender, "POST")
    assert {"/admin/reload", "/admin/rollback", "/admin/checkpoint", "/admin/cache/purge"} <= set(posts)
    assert "/admin/breakers/echo/open" in posts
    before = admin_state(fender)
    body = json.dumps({"prefix": "/"})
    async with httpx.AsyncClient(base_url=fender.admin_url, timeout=5) as client:
        for label, headers, query in bad_credentials():
            for path in posts:
                response = await client.post(
                    path + ("?" + query if query else ""), headers=headers, content=body
                )
                assert response.status_code == 401, (label, path, response.status_code)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert TOKEN not in response.text
        assert admin_state(fender) == before and not checkpoint.exists()

        # With the token each one acts.
        good = {"authorization": f"Bearer {TOKEN}"}
        opened = await client.post("/admin/breakers/echo/open", headers=good)
        assert opened.status_code == 200 and opened.json()["state"] == "open"
        purged = await client.post("/admin/cache/purge", headers=good, content=body)
        assert purged.status_code == 200 and purged.json()["purged"] == 1
        written = await client.post("/admin/checkpoint", headers=good)
        assert written.status_code == 200 and checkpoint.exists()
        reloaded = await client.post("/admin/reload", headers=good)
        assert reloaded.status_code == 200 and reloaded.json()["result"] == "unchanged"
        rolled = await client.post("/admin/rollback", headers=good)
        assert rolled.status_code in (200, 409)  # acted: nothing to roll back to is its own answer
        for path in posts:
            assert (await client.post(path, headers=good, content=body)).status_code != 401, path


async def test_reading_the_admin_api_needs_the_token_too_but_probes_do_not(admin_fender, upstream):
    fender = await admin_fender(policy(upstream.port))
    async with httpx.AsyncClient(base_url=fender.admin_url, timeout=5) as client:
        for path in admin_paths(fender, "GET"):
            for label, headers, query in bad_credentials():
                response = await client.get(path + ("?" + query if query else ""), headers=headers)
                assert response.status_code == 401, (label, path)
            assert (await client.get(path, headers={"authorization": f"Bearer {TOKEN}"})).status_code < 400, (
                path
            )
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200
        # the scheme name is case-insensitive (RFC 9110 11.1); the token is not
        lower = await client.get("/admin/config/status", headers={"authorization": f"bearer {TOKEN}"})
        assert lower.status_code == 200


@pytest.mark.parametrize(
    "target",
    [
        b"//admin/reload",
        b"/admin//reload",
        b"/admin/./reload",
        b"/admin/../admin/reload",
        b"/%61dmin/reload",
        b"/admin%2Freload",
        b"/admin%2freload",
        b"/ADMIN/reload",
        b"/admin/reload/",
        b"/admin/reload;x",
        b"http://127.0.0.1/admin/reload",
    ],
)
async def test_path_spellings_do_not_bypass_the_token(admin_fender, upstream, target):
    fender = await admin_fender(policy(upstream.port))
    request = b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    response = await exchange(fender.admin_port, request)
    assert response.status in (400, 401, 404, 405), (target, response.status)
    assert fender.reloader.last_attempt is None


# --------------------------------------------------------------------------- GET never mutates


async def test_get_head_options_never_mutate_even_with_the_token(admin_fender, upstream, tmp_path):
    checkpoint = tmp_path / "state.json"
    fender = await admin_fender(
        policy(upstream.port, extra=f'checkpoint: {{path: "{checkpoint}", interval: 1h}}\n')
    )
    await fill_cache(fender)
    before = admin_state(fender)
    good = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=fender.admin_url, timeout=5) as client:
        for path in admin_paths(fender, "POST"):
            for method in ("GET", "HEAD", "OPTIONS"):
                response = await client.request(method, path, headers=good)
                assert response.status_code == 405, (method, path, response.status_code)
        for path in admin_paths(fender, "GET"):
            assert (await client.get(path, headers=good)).status_code < 400
    assert admin_state(fender) == before and not checkpoint.exists()


async def test_the_data_port_never_serves_the_admin_api(admin_fender, upstream):
    fender = await admin_fender(policy(upstream.port))
    async with httpx.AsyncClient(base_url=fender.url, timeout=5) as client:
        response = await client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
        assert response.text == "cached"  # the upstream answered: it is just a path there
        assert (await client.get("/metrics")).text == "cached"
    assert [r.target for r in upstream.requests] == [b"/admin/reload", b"/metrics"]
    assert fender.reloader.last_attempt is None


def admin_state(fender) -> dict:
    """Everything a mutating admin call could change."""
    exposed = fender.runtime.exposed
    store = exposed.get("cache", {}).get("store")
    return {
        "runtime": id(fender.runtime),
        "reload": fender.reloader.last_attempt,
        "breakers": [b.snapshot()["state"] for b in exposed.get("breaker", {}).values()],
        "cache_entries": None if store is None else store.entries,
    }


async def test_both_listeners_disable_nagle_on_accepted_connections(admin_fender, upstream):
    """Found by this suite: sockets made without proto=IPPROTO_TCP did not get TCP_NODELAY from
    asyncio, so on the plain asyncio loop every admin answer (head and body written apart) stalled
    ~40ms on the client's delayed ACK. Checked on the server side's accepted sockets."""
    import socket

    fender = await admin_fender(policy(upstream.port, auth=False))
    async with (
        httpx.AsyncClient(base_url=fender.admin_url, timeout=5) as admin_client,
        httpx.AsyncClient(base_url=fender.url, timeout=5) as data_client,
    ):
        assert (await admin_client.get("/healthz")).status_code == 200
        assert (await data_client.get("/page")).status_code == 200
        for server in fender._servers:  # data and admin listener, each with the connection just made
            accepted = [c.transport.get_extra_info("socket") for c in server.server_state.connections]
            assert accepted, server
            assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)
