"""Policy warnings: routes that can never match, limits another limit makes unreachable.

The shadowed-route check is compared with a brute-force model: a linear first-match scan over
the router's own compiled matchers (proxy/dataplane/router.py compile_match), for every request
of a small universe built from the same alphabet as the generated policies.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import textwrap

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.config import Policy
from proxy.config.loader import read_policy
from proxy.config.shadow import shadowed_routes
from proxy.dataplane.router import compile_match
from proxy.server.fender import Fender
from tests.conftest import ROOT

# --------------------------------------------------------------------------- the model

PATHS = ["/", "/a", "/a/", "/ab", "/a/b", "/b"]
HOSTS = ["a.com", "x.a.com", "*.a.com", "*.x.a.com", "b.com"]
METHODS = ["GET", "POST", "DELETE"]
HEADERS = [("x", "1"), ("x", "2"), ("y", "1")]

# Every request of the universe: each literal, each literal plus a character none has, host names
# equal to each literal or under each wildcard with a fresh label, methods listed and not, and any
# set of the tested header fields (a request may carry x: 1 and x: 2 together).
U_PATHS = sorted({p for literal in PATHS for p in (literal, literal + "z")} | {"/zz"})
U_HOSTS = ["", "a.com", "x.a.com", "q.a.com", "q.x.a.com", "b.com", "c.com"]
U_METHODS = [*METHODS, "PUT"]
U_HEADERS = [list(c) for n in range(len(HEADERS) + 1) for c in itertools.combinations(HEADERS, n)]
UNIVERSE = [
    (method, host.encode(), path.encode(), [(k.encode(), v.encode()) for k, v in headers])
    for path in U_PATHS
    for host in U_HOSTS
    for method in U_METHODS
    for headers in U_HEADERS
]


def reachable(policy: Policy) -> list[bool]:
    """For each route: does the linear first-match router pick it for some request of the universe?"""
    matchers = [compile_match(route.match) for route in policy.routes]
    picked = [False] * len(matchers)
    for request in UNIVERSE:
        for index, matcher in enumerate(matchers):
            if matcher(*request):
                picked[index] = True
                break
    return picked


def make_policy(matches: list[dict]) -> Policy:
    return Policy.model_validate(
        {
            "upstreams": {"u": {"replicas": [{"url": "http://127.0.0.1:9"}]}},
            "routes": [{"name": f"r{i}", "upstream": "u", "match": m} for i, m in enumerate(matches)],
        }
    )


@st.composite
def route_matches(draw, regex: bool = False) -> dict:
    match: dict = {}
    kinds = ["prefix", "exact", "none"] + (["regex"] if regex else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "prefix":
        match["path_prefix"] = draw(st.sampled_from(PATHS))
    elif kind == "exact":
        match["path"] = draw(st.sampled_from(PATHS))
    elif kind == "regex":
        match["path_regex"] = draw(st.sampled_from(["/a.*", "/a/?", "/(a|b)", "/.*", "/a/b"]))
    if draw(st.booleans()):
        match["host"] = draw(st.sampled_from(HOSTS))
    match["methods"] = draw(st.lists(st.sampled_from(METHODS), max_size=2, unique=True))
    pairs = draw(st.lists(st.sampled_from(HEADERS), max_size=2, unique_by=lambda p: p[0]))
    match["headers"] = dict(pairs)
    return match


# Routes shadowed only by several earlier routes together (methods split over two routes; an
# exact path under two prefixes with complementary methods), which random draws seldom hit.
UNIONS = [
    [
        {"path_prefix": "/a", "methods": ["GET"]},
        {"path_prefix": "/a", "methods": ["POST"]},
        {"path": "/a/b", "methods": ["GET", "POST"]},
    ],
    [
        {"path_prefix": "/a/", "methods": ["GET"], "host": "*.a.com"},
        {"path_prefix": "/", "methods": ["POST", "GET"], "host": "x.a.com"},
        {"path": "/a/b", "methods": ["GET"], "host": "*.x.a.com"},
        {"path": "/a/b", "methods": ["GET"], "host": "x.a.com"},
    ],
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(route_matches(), min_size=1, max_size=5))
@example(UNIONS[0])
@example(UNIONS[1])
def test_shadow_warning_exactly_when_no_request_reaches_the_route(matches):
    policy = make_policy(matches)
    warned = {index for index, _ in shadowed_routes(policy.routes)}
    picked = reachable(policy)
    assert warned == {i for i, hit in enumerate(picked) if not hit}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(route_matches(regex=True), min_size=1, max_size=5))
def test_with_regexes_a_warning_is_never_wrong(matches):
    policy = make_policy(matches)
    picked = reachable(policy)
    for index, takers in shadowed_routes(policy.routes):
        assert not picked[index]
        assert all(t < index for t in takers)


def warnings_of(routes: str, upstreams: str = "") -> list[str]:
    text = (
        "upstreams:\n  u:\n    replicas: [{url: http://127.0.0.1:9}]\n"
        + textwrap.indent(textwrap.dedent(upstreams), "    ")
        + "routes:\n"
        + textwrap.indent(textwrap.dedent(routes), "  ")
    )
    return [w.as_warning() for w in read_policy(text, "p.yaml").warnings]


def test_examples_of_shadowed_routes():
    found = warnings_of(
        """\
        - {name: api, upstream: u, match: {path_prefix: /api/}}
        - {name: users, upstream: u, match: {path_prefix: /api/users}}
        - {name: gets, upstream: u, match: {path_prefix: /web/, methods: [GET]}}
        - {name: posts, upstream: u, match: {path_prefix: /web/, methods: [POST]}}
        - {name: both, upstream: u, match: {path: /web/x, methods: [GET, POST]}}
        - {name: narrower-first, upstream: u, match: {path_prefix: /n/, methods: [GET]}}
        - {name: broader-later, upstream: u, match: {path_prefix: /n/}}
        - {name: same-regex, upstream: u, match: {path_regex: "/r/[0-9]+"}}
        - {name: same-regex-again, upstream: u, match: {path_regex: "/r/[0-9]+", methods: [GET]}}
        - {name: all, upstream: u}
        - {name: after-all, upstream: u, match: {host: api.example.com}}
        """
    )
    assert found == [
        'p.yaml:6:5: warning: routes[1]: route "users" can never match: route "api" (routes[0]) takes every '
        "request it would, first (routes are tried in file order: move it above, or narrow the earlier match)",
        'p.yaml:9:5: warning: routes[4]: route "both" can never match: routes "gets" (routes[2]) and "posts" '
        "(routes[3]) together take every request it would, first (routes are tried in file order: move it "
        "above, or narrow the earlier match)",
        'p.yaml:13:5: warning: routes[8]: route "same-regex-again" can never match: route "same-regex" '
        "(routes[7]) takes every request it would, first (routes are tried in file order: move it above, or "
        "narrow the earlier match)",
        'p.yaml:15:5: warning: routes[10]: route "after-all" can never match: route "all" (routes[9]) takes '
        "every request it would, first (routes are tried in file order: move it above, or narrow the earlier "
        "match)",
    ]


def test_limits_made_unreachable_by_another_limit():
    found = warnings_of(
        """\
        - name: slow
          upstream: u
          match: {path_prefix: /slow/}
          timeout: 2s
          retry: {per_try_timeout: 2s, max_replay_body: 1MiB}
          max_body: 64KiB
          circuit_breaker: {slow_call_duration: 3s}
          bulkhead: {max_concurrent: 500, queue_timeout: 5s}
        - name: fine
          upstream: u
          match: {path_prefix: /fine/}
          retry: {per_try_timeout: 1s}
          bulkhead: {max_concurrent: 20}
        """,
        upstreams="pool: {max_connections: 10, max_pending: 100}\n",
    )
    assert found == [
        "p.yaml:10:30: warning: routes[0].retry.per_try_timeout: per_try_timeout (2s) is not shorter than the "
        "route's timeout (2s): the route's deadline ends every try first, so it never takes effect",
        "p.yaml:10:51: warning: routes[0].retry.max_replay_body: max_replay_body (1MiB) is above the route's "
        "max_body (64KiB): a larger body is refused with 413 before it could be kept",
        "p.yaml:12:43: warning: routes[0].circuit_breaker.slow_call_duration: slow_call_duration (3s) is not "
        "shorter than the route's timeout (2s): a call that slow has already timed out (a failure), so it "
        "never takes effect",
        "p.yaml:13:32: warning: routes[0].bulkhead.max_concurrent: max_concurrent (500) can never be reached: "
        'upstream "u" admits at most 110 requests at once (1 replicas x (pool.max_connections 10 + '
        "pool.max_pending 100)); beyond that its pools answer 503 first",
        "p.yaml:13:52: warning: routes[0].bulkhead.queue_timeout: queue_timeout (5s) is not shorter than the "
        "route's timeout (2s): the route's deadline ends every wait first, so it never takes effect",
    ]


def test_a_rate_limit_made_redundant_by_a_stricter_one():
    found = warnings_of(
        """\
        - name: limited
          upstream: u
          rate_limit:
            - {key: route, rate: 100/s}
            - {key: client_ip, rate: 200/s, burst: 300}
            - {key: client_ip, rate: 50/s, name: per-client}
            - {key: header:X-Team, rate: 10/s, shadow: true}
        """
    )
    assert found == [
        'p.yaml:9:9: warning: routes[0].rate_limit[1]: rate limit "client_ip" (200/s, burst 300) can never '
        'refuse first: rate limit "route" (100/s, burst 100) counts every request it counts and is no looser'
    ]


SHADOWED = """\
listen: 127.0.0.1:0
admin: 127.0.0.1:0
reload: {watch: false}
upstreams:
  u: {replicas: [{url: http://127.0.0.1:9}]}
routes:
  - {name: all, upstream: u}
  - {name: later, upstream: u, match: {path: /x}}
"""
LATER_WARNING = (
    'warning: routes[1]: route "later" can never match: route "all" (routes[0]) takes every request it '
    "would, first (routes are tried in file order: move it above, or narrow the earlier match)"
)


def test_validate_prints_warnings_and_passes(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(SHADOWED)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "validate", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"{path}:8:5: {LATER_WARNING}"]
    assert result.stdout.startswith(f"{path}: ok (2 routes")


async def test_reload_logs_warnings_and_config_status_lists_them(tmp_path, caplog):
    path = tmp_path / "policy.yaml"
    path.write_text(
        SHADOWED.replace(
            "  - {name: later", "  - {name: first, upstream: u, match: {path: /y}}\n  - {name: later"
        )
    )
    from proxy.config import load_policy

    fender = Fender(load_policy(path), str(path))
    from proxy.server.fender import bind_socket

    await fender.start(bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fender.admin_port}") as client:
            assert (await client.get("/admin/config/status")).json()["warnings"] == []
            path.write_text(SHADOWED)
            with caplog.at_level(logging.INFO, logger="fender"):
                reloaded = await client.post("/admin/reload")
            assert reloaded.json()["result"] == "applied"
            status = (await client.get("/admin/config/status")).json()
        assert status["warnings"] == [f"{path}:8:5: {LATER_WARNING}"]
        applied = [r.getMessage() for r in caplog.records if "applied (api)" in r.getMessage()]
        assert len(applied) == 1 and applied[0].endswith(f"; 1 warning:\n{path}:8:5: {LATER_WARNING}")
    finally:
        await fender.stop()
