"""Unit tests of the data path's pure parts: path normalisation, header rules, routing."""

from types import SimpleNamespace

import pytest

from proxy.dataplane.headers import RequestHead, TrustedProxies, add_forwarding, response_headers
from proxy.dataplane.paths import normalise_path
from proxy.dataplane.router import Router, compile_match, host_without_port


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/a/b", b"/a/b"),
        (b"/public/../admin", b"/admin"),
        (b"/a/./b/", b"/a/b/"),
        (b"//a///b", b"/a/b"),
        (b"/a/%2e%2e/b", b"/b"),
        (b"/a/%2E%2E/%2e/b", b"/b"),
        (b"/a%2fb", b"/a%2Fb"),  # an encoded slash never splits a segment
        (b"/..", b"/"),
        (b"/a/b/..", b"/a/"),
        (b"/%7euser", b"/~user"),
        (b"/%41%42", b"/AB"),
        (b"/%zz", None),
        (b"/a%", None),
        (b"/a%2", None),
        (b"http://example.com/", None),
        (b"*", None),
    ],
)
def test_normalise_path(raw, expected):
    assert normalise_path(raw) == expected


def test_request_head_drops_hop_by_hop_and_connection_named():
    head = RequestHead(
        [
            (b"host", b"svc"),
            (b"connection", b"keep-alive, X-Secret"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"gzip"),
            (b"upgrade", b"websocket"),
            (b"proxy-connection", b"keep-alive"),
            (b"x-secret", b"1"),
            (b"accept", b"*/*"),
            (b"content-length", b"3"),
        ]
    )
    assert head.forward == [(b"accept", b"*/*")]
    assert head.te_trailers is False
    assert head.host == b"svc"
    assert head.content_length == 3
    assert head.bad is None


def test_request_head_passes_te_trailers_only():
    head = RequestHead([(b"host", b"svc"), (b"te", b"gzip, Trailers"), (b"connection", b"te")])
    assert head.forward == [(b"te", b"trailers")]
    assert head.te_trailers is True


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-length", b"3"), (b"content-length", b"4")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"abc")],
        [(b"host", b"a"), (b"host", b"b")],
    ],
)
def test_request_head_refuses_ambiguous_framing_and_hosts(headers):
    assert RequestHead(headers).bad is not None


def test_untrusted_peer_cannot_choose_forwarded_headers():
    head = RequestHead(
        [(b"host", b"svc:80"), (b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-proto", b"https")]
    )
    add_forwarding(head, "10.1.2.3", b"http", "1.1", TrustedProxies([]))
    sent = dict(head.forward)
    assert sent[b"x-forwarded-for"] == b"10.1.2.3"
    assert sent[b"x-forwarded-proto"] == b"http"
    assert sent[b"x-forwarded-host"] == b"svc:80"
    assert sent[b"via"] == b"1.1 fender"
    assert sent[b"x-request-id"] == head.request_id and head.request_id


def test_trusted_peer_chain_is_appended():
    head = RequestHead([(b"host", b"svc"), (b"x-forwarded-for", b"1.1.1.1"), (b"via", b"1.1 edge")])
    add_forwarding(head, "10.0.0.7", b"http", "1.1", TrustedProxies(["10.0.0.0/8"]))
    sent = dict(head.forward)
    assert sent[b"x-forwarded-for"] == b"1.1.1.1, 10.0.0.7"
    assert sent[b"via"] == b"1.1 edge, 1.1 fender"


def test_request_id_kept_when_sane_and_replaced_when_not():
    kept = RequestHead([(b"x-request-id", b"abc-123")])
    add_forwarding(kept, "127.0.0.1", b"http", "1.1", TrustedProxies([]))
    assert kept.request_id == b"abc-123"
    bad = RequestHead([(b"x-request-id", b"has space")])
    add_forwarding(bad, "127.0.0.1", b"http", "1.1", TrustedProxies([]))
    assert bad.request_id != b"has space" and b" " not in bad.request_id
    other = RequestHead([])
    add_forwarding(other, "127.0.0.1", b"http", "1.1", TrustedProxies([]))
    assert other.request_id != bad.request_id


def test_response_headers_strip_hop_by_hop_and_fix_framing():
    out = response_headers(
        [
            (b"content-type", b"text/plain"),
            (b"date", b"Thu, 26 Nov 2026 07:00:00 GMT"),
            (b"connection", b"close, x-internal"),
            (b"x-internal", b"secret"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"10"),
            (b"keep-alive", b"timeout=1"),
            (b"x-request-id", b"upstream-made"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ],
        b"rid-1",
    )
    assert out == [
        (b"content-type", b"text/plain"),
        (b"date", b"Thu, 26 Nov 2026 07:00:00 GMT"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"via", b"1.1 fender"),
        (b"x-request-id", b"rid-1"),
    ]


def _match(**kw):
    fields = {
        "path": None,
        "path_prefix": None,
        "path_regex": None,
        "host": None,
        "methods": [],
        "headers": {},
    }
    fields.update(kw)
    return SimpleNamespace(**fields)


def test_router_first_match_wins_and_conditions_combine():
    router = Router(
        [
            (compile_match(_match(path_prefix="/api", methods=["POST"])), "api-post"),
            (compile_match(_match(path_prefix="/api", host="*.example.com")), "api-wild"),
            (compile_match(_match(path="/exact", headers={"X-Tenant": "blue"})), "exact-blue"),
            (compile_match(_match(path_regex=r"/items/[0-9]+")), "item"),
            (compile_match(_match(path_prefix="/static")), "static"),
        ]
    )
    assert router.match("POST", b"x", b"/api/v1", []) == "api-post"
    assert router.match("GET", b"a.example.com", b"/api/v1", []) == "api-wild"
    assert router.match("GET", b"example.com", b"/api/v1", []) is None
    assert router.match("GET", b"h", b"/exact", [(b"x-tenant", b"blue")]) == "exact-blue"
    assert router.match("GET", b"h", b"/exact", [(b"x-tenant", b"green")]) is None
    assert router.match("GET", b"h", b"/items/42", []) == "item"
    assert router.match("GET", b"h", b"/items/42/x", []) is None
    assert router.match("GET", b"h", b"/static/app.js", []) == "static"
    assert router.match("GET", b"h", b"/nothing", []) is None


def test_router_prefix_routes_fall_through_in_file_order_to_a_catch_all():
    # Prefix routes are tested inline by the Router (PathPrefix); order and the other conditions still hold.
    router = Router(
        [
            (compile_match(_match(path_prefix="/api", methods=["POST"])), "api-post"),
            (compile_match(_match(path_regex=r"/api/v[0-9]+")), "api-version"),
            (compile_match(_match(path_prefix="/api")), "api"),
            (compile_match(_match(methods=["DELETE"])), "any-delete"),
            (compile_match(_match()), "catch-all"),
        ]
    )
    assert router.match("POST", b"h", b"/api/v1", []) == "api-post"
    assert router.match("GET", b"h", b"/api/v1", []) == "api-version"
    assert router.match("GET", b"h", b"/api/x", []) == "api"
    assert router.match("GET", b"h", b"/apis", []) == "api"  # a prefix is raw bytes, as before
    assert router.match("DELETE", b"h", b"/other", []) == "any-delete"
    assert router.match("GET", b"h", b"/other", []) == "catch-all"
    assert router.match("GET", b"h", b"/", []) == "catch-all"


@pytest.mark.parametrize(
    ("host", "expected"),
    [(b"Example.COM:8080", b"example.com"), (b"[::1]:80", b"[::1]"), (b"svc", b"svc"), (None, b"")],
)
def test_host_without_port(host, expected):
    assert host_without_port(host) == expected


def test_client_address_walks_trusted_chain_only():
    trusted = TrustedProxies(["10.0.0.0/8"])
    head = RequestHead([(b"x-forwarded-for", b"203.0.113.9, 198.51.100.1, 10.0.0.3")])
    add_forwarding(head, "10.0.0.2", b"http", "1.1", trusted)
    assert head.client == "198.51.100.1"  # first untrusted hop from the right; its left part is unverified
    spoofed = RequestHead([(b"x-forwarded-for", b"1.2.3.4")])
    add_forwarding(spoofed, "192.0.2.7", b"http", "1.1", trusted)
    assert spoofed.client == "192.0.2.7"  # the peer is not trusted: its XFF means nothing


def test_response_without_date_gets_one():
    out = dict(response_headers([(b"content-type", b"text/plain")], b"rid-2"))
    assert out[b"date"].endswith(b" GMT") and len(out[b"date"]) == 29
