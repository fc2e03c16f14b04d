"""The indexed router against the plain meaning of routes: first match in file order.

The reference below reads the route models directly (path equal, prefix, regex
fullmatch, methods, host, headers) and scans them in file order: it shares no
code with either router. Hypothesis generates policies whose paths share
prefixes, with trailing slashes, exact and prefix routes on the same paths,
conditional routes that must fall through, regexes (with and without a literal
start) and catch-alls anywhere, and requests aimed at and around every route.
"""

from __future__ import annotations

import re

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config.models import RouteMatch
from proxy.dataplane.router import (
    INDEX_FROM_ROUTES,
    IndexedRouter,
    Router,
    build_router,
    compile_match,
    regex_literal_prefix,
)
from tests.conftest import policy_text
from tests.support.metrics import get_metrics, metric_value

METHODS = ("GET", "POST", "DELETE")
SEGMENTS = ("a", "ab", "b", "a1", "12", "")  # shared starts ("a", "ab", "a1"), empty = "//"-like ends


def reference_match(matches: list[RouteMatch], method: str, host: bytes, path: bytes, headers: list):
    """Index of the first route whose every condition holds, in file order; None when none does."""
    for index, match in enumerate(matches):
        if match.path is not None and path != match.path.encode():
            continue
        if match.path_prefix is not None and not path.startswith(match.path_prefix.encode()):
            continue
        if match.path_regex is not None and re.fullmatch(match.path_regex.encode(), path) is None:
            continue
        if match.methods and method not in match.methods:
            continue
        if match.host:
            wanted = match.host.lower().encode()
            if wanted.startswith(b"*."):
                if not (host.endswith(wanted[1:]) and host != wanted[1:]):
                    continue
            elif host != wanted:
                continue
        if any(
            (name.lower().encode(), value.encode()) not in headers for name, value in match.headers.items()
        ):
            continue
        return index
    return None


paths = st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=3).map(lambda segs: "/" + "/".join(segs))

# Regex pieces: literals (some followed by a quantifier, so the literal start is shorter than the
# leading run), classes, groups, alternations, an inline flag at the start, escapes.
regex_pieces = st.sampled_from(
    [
        "a",
        "b",
        "/",
        "1",
        "a?",
        "b*",
        "1+",
        "a{0,2}",
        "[0-9]+",
        "[ab]",
        ".*",
        "(a|b)",
        "(?:ab)+",
        r"\d*",
        r"\/",
    ]
)


@st.composite
def regexes(draw) -> str:
    start = draw(st.sampled_from(["", "/", "/a", "/ab", "/a/", "(?i)/A", "/a|/b"]))
    return start + "".join(draw(st.lists(regex_pieces, max_size=4)))


@st.composite
def route_matches(draw) -> RouteMatch:
    fields: dict = {}
    kind = draw(st.sampled_from(["prefix", "prefix", "exact", "exact", "regex", "none"]))
    if kind == "prefix":
        fields["path_prefix"] = draw(paths) + draw(st.sampled_from(["", "/"]))
    elif kind == "exact":
        fields["path"] = draw(paths) + draw(st.sampled_from(["", "/"]))
    elif kind == "regex":
        fields["path_regex"] = draw(regexes())
    # Extra conditions, each absent most of the time: a route that fails one must fall through.
    if draw(st.integers(0, 3)) == 0:
        fields["methods"] = draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=2))
    if draw(st.integers(0, 4)) == 0:
        fields["host"] = draw(st.sampled_from(["a.test", "*.test", "A.Test"]))
    if draw(st.integers(0, 4)) == 0:
        fields["headers"] = {"X-T": draw(st.sampled_from(["1", "2"]))}
    return RouteMatch.model_validate(fields)


requests_ = st.tuples(
    st.sampled_from((*METHODS, "PUT")),
    st.sampled_from([b"", b"a.test", b"b.a.test", b"test", b"x.test"]),
    st.sampled_from([[], [(b"x-t", b"1")], [(b"x-t", b"2"), (b"other", b"1")]]),
)


def probe_paths(matches: list[RouteMatch], extra: list[str]) -> set[bytes]:
    """Every route's own path and its neighbours: one byte more or less, a slash more, a digit more."""
    probes = {b"/", b"/zzz", *(p.encode() for p in extra)}
    for match in matches:
        text = match.path or match.path_prefix or regex_literal_prefix(match.path_regex.encode()).decode()
        raw = text.encode()
        probes |= {raw, raw + b"/", raw + b"a", raw + b"1", raw + b"12", raw[:-1] or b"/", raw + b"/a"}
    return {p for p in probes if p.startswith(b"/")}


def check_agrees(matches: list[RouteMatch], requests: list, extra_paths: list[str], router) -> int:
    compiled = [(compile_match(m), i) for i, m in enumerate(matches)]
    routers = [router(compiled), Router(compiled), build_router(compiled)]
    checked = 0
    for path in sorted(probe_paths(matches, extra_paths)):
        for method, host, headers in requests:
            want = reference_match(matches, method, host, path, headers)
            for r in routers:
                got = r.match(method, host, path, headers)
                assert got == want, (type(r).__name__, method, host, path, headers, got, want)
            checked += 1
    return checked


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    matches=st.lists(route_matches(), min_size=1, max_size=24),
    requests=st.lists(requests_, min_size=1, max_size=4),
    extra_paths=st.lists(paths, max_size=4),
)
def test_indexed_router_agrees_with_the_file_order_scan(matches, requests, extra_paths):
    assert check_agrees(matches, requests, extra_paths, IndexedRouter) > 0


@settings(max_examples=300, deadline=None)
@given(
    matches=st.lists(route_matches(), min_size=1, max_size=16),
    requests=st.lists(requests_, min_size=1, max_size=3),
    max_cells=st.integers(0, 40),
)
def test_a_capped_index_is_refused_or_agrees(matches, requests, max_cells):
    # Whatever the cap, the index is either built whole and right or refused (build_router's scan).
    compiled = [(compile_match(m), i) for i, m in enumerate(matches)]
    try:
        IndexedRouter(compiled, max_cells=max_cells)
    except Exception as exc:  # only the one refusal: nothing else may escape a policy load
        assert type(exc).__name__ == "IndexTooLarge"
        return
    check_agrees(matches, requests, [], lambda c: IndexedRouter(c, max_cells=max_cells))


@settings(max_examples=1000, deadline=None)
@given(pattern=regexes(), path=st.binary(max_size=8).map(lambda tail: b"/" + tail), tail=paths)
def test_a_regex_only_matches_paths_starting_with_its_literal_prefix(pattern, path, tail):
    prefix = regex_literal_prefix(pattern.encode())
    for candidate in (path, tail.encode(), prefix + path[1:], prefix + tail.encode()):
        if re.fullmatch(pattern.encode(), candidate):
            assert candidate.startswith(prefix), (pattern, candidate, prefix)


def test_regex_literal_prefix_stops_where_the_pattern_stops_being_literal():
    assert regex_literal_prefix(rb"/api/v[0-9]+/users") == b"/api/v"
    assert regex_literal_prefix(rb"/items/ab?") == b"/items/a"  # the ? makes the b optional
    assert regex_literal_prefix(rb"/a{0}b") == b"/"
    assert regex_literal_prefix(rb"/exact") == b"/exact"
    assert regex_literal_prefix(rb"/a|/b") == b""  # an alternation: other starts possible
    assert regex_literal_prefix(rb"(?i)/api") == b""
    assert regex_literal_prefix(rb"\/api") == b""


def _m(**fields) -> RouteMatch:
    return RouteMatch.model_validate(fields)


def test_fall_through_and_file_order_under_one_key():
    matches = [
        _m(path_prefix="/api/", methods=["POST"]),  # 0: conditional, must fall through for GET
        _m(path="/api/users", headers={"X-T": "1"}),  # 1: exact, conditional
        _m(path_regex=r"/api/users/[0-9]+"),  # 2: regex under /api/users/
        _m(path_prefix="/api/users"),  # 3
        _m(path_prefix="/api"),  # 4: shorter prefix, later in the file
        _m(path="/api/users"),  # 5: exact, after prefixes that take it: never reached
        _m(host="*.test"),  # 6: a conditional catch-all in the middle
        _m(path_prefix="/static/"),  # 7
        _m(),  # 8: catch-all
        _m(path="/never"),  # 9: after the catch-all
    ]
    router = IndexedRouter([(compile_match(m), i) for i, m in enumerate(matches)])
    assert router.match("POST", b"h", b"/api/users", []) == 0
    assert router.match("GET", b"h", b"/api/users", [(b"x-t", b"1")]) == 1
    assert router.match("GET", b"h", b"/api/users", []) == 3
    assert router.match("GET", b"h", b"/api/users/42", []) == 2
    assert router.match("GET", b"h", b"/api/users/x", []) == 3
    assert router.match("GET", b"h", b"/api/other", []) == 4
    assert router.match("GET", b"h", b"/apis", []) == 4  # a prefix is raw bytes
    assert router.match("GET", b"a.test", b"/static/x", []) == 6
    assert router.match("GET", b"h", b"/static/x", []) == 7
    assert router.match("GET", b"h", b"/never", []) == 8
    assert router.match("GET", b"h", b"/static", []) == 8


def test_build_router_scans_a_few_routes_and_indexes_more():
    few = [(compile_match(_m(path_prefix=f"/r{i}/")), i) for i in range(INDEX_FROM_ROUTES - 1)]
    many = [(compile_match(_m(path_prefix=f"/r{i}/")), i) for i in range(INDEX_FROM_ROUTES)]
    assert type(build_router(few)) is Router
    assert type(build_router(many)) is IndexedRouter
    nested = [(compile_match(_m(path_prefix="/" + "a" * i, methods=["POST"])), i) for i in range(1, 2000)]
    assert type(build_router(nested)) is Router  # 2 million cells: over the cap, the scan instead
    assert build_router(nested).match("POST", b"h", b"/aaa", []) == 1


async def test_a_policy_of_many_routes_routes_each_request_to_its_first_match(echo_upstream, start_fender):
    # Over real sockets: a policy large enough to be indexed, requests to routes at its end.
    routes = "".join(
        f"- {{name: p{i}, match: {{path_prefix: /svc{i}/}}, upstream: echo}}\n"
        f"- {{name: e{i}, match: {{path: /svc{i}/health, methods: [POST]}}, upstream: echo}}\n"
        for i in range(20)
    )
    routes = (
        "- {name: early_exact, match: {path: /svc19/health, headers: {X-T: '1'}}, upstream: echo}\n"
        + routes
        + "- {name: items, match: {path_regex: '/items/[0-9]+'}, upstream: echo}\n"
        + "- {name: rest, upstream: echo}\n"
    )
    fender = await start_fender(policy_text(echo_upstream.port, routes))
    assert type(fender.runtime.router) is IndexedRouter
    async with httpx.AsyncClient() as client:
        for method, path, headers in [
            ("GET", "/svc19/health", {"X-T": "1"}),  # early_exact
            ("POST", "/svc19/health", {}),  # p19: the prefix comes first in the file
            ("GET", "/svc19/x", {}),  # p19
            ("GET", "/items/42", {}),  # items
            ("GET", "/items/x", {}),  # rest
            ("GET", "/svc20/", {}),  # rest
        ]:
            assert (await client.request(method, fender.url + path, headers=headers)).status_code == 200
    text = await get_metrics(fender)
    counts = {
        name: metric_value(text, "fender_requests_total", route=name)
        for name in ("early_exact", "p19", "e19", "items", "rest")
    }
    assert counts == {"early_exact": 1, "p19": 2, "e19": 0, "items": 1, "rest": 2}
