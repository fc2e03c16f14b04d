"""Retry budget per upstream (issue 24): ``budget: {scope: upstream}`` is one budget shared by the
routes sending to that upstream; the route-level budget stays the default. Over real sockets, on
a policy file (so a reload can show the shared budget is kept)."""

from __future__ import annotations

import textwrap

import httpx
import pytest

from proxy.config import PolicyError, parse_policy
from tests.support.metrics import metric_value
from tests.support.policyfile import at, fenders  # noqa: F401  (the fenders fixture)
from tests.support.raw_upstream import RawUpstream, status


def policy(port: int, scope: str, second_budget: str = "", timeout: str = "15s") -> str:
    # A reserve of exactly one retry per window (0.125/s x 8s) and no ratio: one retry, then none.
    budget = f"{{ratio: 0%, min_per_second: 0.125, window: 8s, scope: {scope}}}"
    return textwrap.dedent(
        f"""\
        listen: 127.0.0.1:0
        admin: 127.0.0.1:0
        reload: {{watch: false}}
        upstreams:
          up: {{replicas: [{{url: http://127.0.0.1:{port}}}]}}
        routes:
          - name: a
            upstream: up
            timeout: {timeout}
            match: {{path_prefix: /a}}
            retry: {{attempts: 2, retry_on: [503], backoff: {{initial: 1ms, max: 1ms}}, budget: {budget}}}
          - name: b
            upstream: up
            retry: {{attempts: 2, retry_on: [503], backoff: {{initial: 1ms, max: 1ms}}, budget: {second_budget or budget}}}
        """
    )


def test_routes_sharing_an_upstream_budget_must_agree_on_it():
    text = policy(9, "upstream", second_budget="{ratio: 10%, scope: upstream}")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "drill.yaml")
    found = [str(issue) for issue in info.value.issues]
    assert len(found) == 1
    assert found[0].startswith(f'{at(text, "{ratio: 10%")}: routes[1].retry.budget: routes[0] ("a") shares')
    # Different settings are fine per route, and scope is checked like any field.
    parse_policy(policy(9, "route", second_budget="{ratio: 10%}"))
    with pytest.raises(PolicyError, match="scope"):
        parse_policy(policy(9, "cluster"))


@pytest.mark.parametrize("scope", ["upstream", "route"])
async def test_an_upstream_budget_is_spent_by_every_route_using_it(fenders, scope):  # noqa: F811
    async with RawUpstream(status(503)) as up:
        fender = await fenders(policy(up.port, scope))
        async with httpx.AsyncClient(base_url=fender.url) as client:
            a = await client.get("/a")  # retried: the budget's one retry
            b = await client.get("/b")  # shared: spent by route a; per route: b's own retry
            metrics = (await client.get(fender.admin_url + "/metrics")).text
            page = (await client.get(fender.admin_url + "/admin/status")).json()
    assert a.status_code == b.status_code == 503
    (shown,) = [u["retry_budget"] for u in page["upstreams"] if u["name"] == "up"]
    # The status page shows a shared budget (one retry allowed and spent); a route's own is not there.
    assert shown == ({"requests": 2, "retries": 1, "allowed": 1} if scope == "upstream" else None)
    assert "x-fender-retry" not in a.headers
    if scope == "upstream":
        assert b.headers["x-fender-retry"] == "budget-exhausted" and len(up.requests) == 3
        assert metric_value(metrics, "fender_retry_budget_exhausted_total", route="b") == 1
    else:
        assert "x-fender-retry" not in b.headers and len(up.requests) == 4
        assert metric_value(metrics, "fender_retry_budget_exhausted_total", route="b") == 0


async def test_a_reload_with_equal_settings_keeps_the_shared_budget(fenders):  # noqa: F811
    async with RawUpstream(status(503)) as up:
        fender = await fenders(policy(up.port, "upstream"))
        budget = fender.dataplane.runtime.exposed["retry_budget"]["up"]
        async with httpx.AsyncClient(base_url=fender.url) as client:
            await client.get("/a")
            assert budget.snapshot() == {"requests": 1, "retries": 1, "allowed": 1}
            await fenders.reload(fender, policy(up.port, "upstream", timeout="14s"))
            assert fender.dataplane.runtime.exposed["retry_budget"]["up"] is budget
            b = await client.get("/b")  # the retry spent before the reload still counts
    assert b.headers["x-fender-retry"] == "budget-exhausted" and budget.snapshot() == {
        "requests": 2,
        "retries": 1,
        "allowed": 1,
    }
