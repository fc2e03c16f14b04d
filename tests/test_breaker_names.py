"""Routes sharing an upstream's breaker, one of which changes its breaker settings on reload
(issue 24): every breaker keeps one name of its own, in /admin/breakers and in checkpoints, and
the breaker whose settings did not change keeps its state and its name."""

from __future__ import annotations

import textwrap

import httpx
import pytest

from tests.support.policyfile import fenders  # noqa: F401  (the fenders fixture)
from tests.support.raw_upstream import RawUpstream, ok


def policy(port: int, a: str, b: str, order: str = "ab", extra_route: str = "") -> str:
    routes = {
        "a": f"  - {{name: a, upstream: u, match: {{path_prefix: /a}}, circuit_breaker: {a}}}\n",
        "b": f"  - {{name: b, upstream: u, match: {{path_prefix: /b}}, circuit_breaker: {b}}}\n",
    }
    return (
        textwrap.dedent(
            f"""\
            listen: 127.0.0.1:0
            admin: 127.0.0.1:0
            reload: {{watch: false}}
            upstreams:
              u: {{replicas: [{{url: http://127.0.0.1:{port}}}]}}
            routes:
            """
        )
        + extra_route
        + "".join(routes[name] for name in order)
    )


SAME = "{scope: upstream, open_for: 1h}"
OTHER = "{scope: upstream, open_for: 1h, consecutive_failures: 2}"


async def breakers(fender) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
        listed = (await admin.get("/admin/breakers")).json()["breakers"]
    names = [b["name"] for b in listed]
    assert len(names) == len(set(names)), names
    return {b["name"]: b["state"] for b in listed}


def checkpointed(fender) -> dict[str, str]:
    runtime = fender.dataplane.runtime
    snapshots = runtime.checkpoints.snapshot_all()
    return {
        name: snapshots[name]["state"] for name in runtime.checkpoints.names() if name.startswith("breaker/")
    }


@pytest.mark.parametrize("order", ["ab", "ba"])
async def test_a_route_changing_its_shared_breaker_gets_a_breaker_and_name_of_its_own(fenders, order):  # noqa: F811
    async with RawUpstream(ok()) as up:
        fender = await fenders(policy(up.port, SAME, SAME, order))
        assert await breakers(fender) == {"u": "closed"}
        async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
            assert (await admin.post("/admin/breakers/u/open")).status_code == 200
        shared = fender.dataplane.runtime.exposed["breaker"]["u"]

        await fenders.reload(fender, policy(up.port, OTHER, SAME, order))  # a changes, b keeps the shared one
        assert await breakers(fender) == {"u": "open", "u.a": "closed"}
        exposed = fender.dataplane.runtime.exposed["breaker"]
        assert exposed["u"] is shared and exposed["u.a"] is not shared
        assert checkpointed(fender) == {"breaker/u": "open", "breaker/u.a": "closed"}
        async with httpx.AsyncClient(base_url=fender.url) as data:
            assert (await data.get("/b")).headers["x-fender-error"] == "breaker_open"  # b: the kept, open one
            assert (await data.get("/a")).status_code == 200  # a: its own, closed

        await fenders.reload(fender, policy(up.port, SAME, SAME, order))  # a back: both share the kept one
        assert await breakers(fender) == {"u": "open"}
        assert checkpointed(fender) == {"breaker/u": "open"}


async def test_a_new_route_first_in_the_file_does_not_take_a_kept_breaker_name(fenders):  # noqa: F811
    async with RawUpstream(ok()) as up:
        fender = await fenders(policy(up.port, SAME, SAME))
        async with httpx.AsyncClient(base_url=fender.admin_url) as admin:
            await admin.post("/admin/breakers/u/open")
        first = f"  - {{name: c, upstream: u, match: {{path_prefix: /c}}, circuit_breaker: {OTHER}}}\n"
        await fenders.reload(fender, policy(up.port, SAME, SAME, extra_route=first))
        assert await breakers(fender) == {"u": "open", "u.c": "closed"}
        assert checkpointed(fender) == {"breaker/u": "open", "breaker/u.c": "closed"}
