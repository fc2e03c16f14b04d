"""The policy file as pydantic models.

The root is :class:`Policy`.  Every model derives from :class:`PolicyModel`
(unknown keys refused, immutable, defaults validated), and every field carries
a ``description=`` that is the user documentation: it flows into the JSON
Schema (``policies/schema.json``) and the policy reference (docs/reference.md).

Adding a section to a route later (``rate_limit``, ``retry``, ...) is one
optional field on :class:`Route` whose type is another :class:`PolicyModel`;
cross-field checks go in :meth:`Policy._cross_checks` and report through
:func:`~proxy.options.units.policy_error` with a location so the loader can
print the right line and column.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    Strict,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from proxy.cluster.options import (
    SLOW_START_DESCRIPTION,
    Balance,
    DnsOptions,
    HealthCheckOptions,
    OutlierDetectionOptions,
)
from proxy.ops.options import AdminAuthOptions, CheckpointOptions, DrainOptions, ReloadOptions
from proxy.options.units import Duration, Percent, Size, describe_value, format_size, policy_error
from proxy.policies.adaptive.options import AdaptiveConcurrencyOptions
from proxy.policies.breaker.options import BreakerOptions
from proxy.policies.bulkhead.options import BulkheadOptions
from proxy.policies.fault.options import FaultOptions
from proxy.policies.ratelimit.options import RateLimits
from proxy.policies.retry.options import HedgeOptions, RetryOptions

__all__ = [
    "PolicyModel",
    "Name",
    "Count",
    "Flag",
    "Text",
    "IpNetwork",
    "ListenAddress",
    "ServerOptions",
    "PoolOptions",
    "Replica",
    "Upstream",
    "RouteMatch",
    "Route",
    "Policy",
    "dump_policy",
    "NAME_PATTERN",
    "KNOWN_METHODS",
]


from proxy.kernel.reasons import KNOWN_METHODS
from proxy.options.base import (  # noqa: E402  (re-exported: the models' building blocks)
    NAME_PATTERN,
    Count,
    Flag,
    HeaderName,
    IpNetwork,
    Name,
    PolicyModel,
    Text,
    _check_host,
    _valid_hostname,
    check_host_port,
    is_loopback,
    keep_ordered,
)
from proxy.options.tls import ListenerTLSOptions, UpstreamTLSOptions  # noqa: E402
from proxy.policies.cache.options import CacheOptions, CacheStoreOptions  # noqa: E402
from proxy.state.options import StateOptions  # noqa: E402
from proxy.tracing.options import TracingOptions  # noqa: E402

# --------------------------------------------------------------------------- listen addresses

_LISTEN_HINT = "write it like 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080"
LISTEN_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"


def _parse_listen(text: str) -> dict[str, Any]:
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep:
            raise policy_error(f'{describe_value(text)}: missing "]" after the IPv6 address ({_LISTEN_HINT})')
        if not rest.startswith(":"):
            raise policy_error(f"{describe_value(text)}: the port is missing ({_LISTEN_HINT})")
        host, port_text = inner, rest[1:]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise policy_error(
                f"{describe_value(text)}: {host!r} is not an IPv6 address ({_LISTEN_HINT})"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise policy_error(f"{describe_value(text)}: the port is missing ({_LISTEN_HINT})")
        if ":" in host:
            raise policy_error(
                f"{describe_value(text)}: write IPv6 addresses in brackets, like [::1]:8080 or [::]:8080"
            )
        if not host:
            raise policy_error(
                f"{describe_value(text)}: the host is missing "
                f"(write 127.0.0.1{text} for this machine only, or 0.0.0.0{text} for all interfaces)"
            )
        try:
            host = _check_host(host, "127.0.0.1:8080")
        except ValueError as exc:
            raise policy_error(f"{describe_value(text)}: {exc}") from None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise policy_error(
            f"{describe_value(text)}: the port must be a number from 0 to 65535 (0 picks a free port)"
        )
    return {"host": host, "port": int(port_text)}


class ListenAddress(PolicyModel):
    """A ``host:port`` a listener binds to; written as one string in the policy file."""

    host: Text = Field(description="IP address or host name to bind; IPv6 addresses without brackets.")
    port: Count = Field(ge=0, le=65535, description="TCP port; 0 lets the OS pick a free port (for tests).")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            return _parse_listen(data)
        if isinstance(data, dict | ListenAddress):
            return data
        if isinstance(data, int) and not isinstance(data, bool):
            raise policy_error(
                f"{data} is only a port; write 127.0.0.1:{data} (or 0.0.0.0:{data} for all interfaces)"
            )
        raise policy_error(f"expected host:port, got {describe_value(data)} ({_LISTEN_HINT})")

    @model_serializer(mode="plain")
    def _to_text(self) -> str:
        return str(self)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        return {
            "type": "string",
            "pattern": LISTEN_PATTERN,
            "examples": ["127.0.0.1:8080", "0.0.0.0:8080", "[::1]:8080"],
        }

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        """True when bound to every interface (``0.0.0.0`` or ``::``)."""
        return self.host in ("0.0.0.0", "::")

    def overlaps(self, other: ListenAddress) -> bool:
        """Whether binding both addresses would clash (same port, and same host or a wildcard)."""
        if self.port == 0 or other.port == 0 or self.port != other.port:
            return False
        return self.host == other.host or self.is_wildcard or other.is_wildcard


# --------------------------------------------------------------------------- server


class Http2Options(PolicyModel):
    """HTTP/2 on the data listener: h2c with prior knowledge on the HTTP/1.1 port, h2 by ALPN over TLS."""

    enabled: Flag = Field(
        default=True,
        description=(
            "Serve HTTP/2 on the data listener: a connection that opens with the HTTP/2 preface (h2c with "
            "prior knowledge) or negotiates h2 by ALPN. false answers the preface as HTTP/1.1 does (400). "
            "The uvicorn engine only (granian stays HTTP/1.1)."
        ),
    )
    max_concurrent_streams: Count = Field(
        default=100,
        ge=1,
        le=10_000,
        description=(
            "Streams (requests) one client connection may have open at once, advertised in SETTINGS; a "
            "stream beyond it is refused with RST_STREAM REFUSED_STREAM (nothing was processed, the client "
            "may retry it). 100 as NGINX, Envoy and the RFC's recommended minimum."
        ),
    )
    max_header_list_size: Annotated[Size, Field(ge=1024, le=1 << 24)] = Field(
        default="32KiB",
        validate_default=True,
        description=(
            "Largest decoded request header list (names, values and 32 bytes per field, RFC 9113 6.5.2), "
            "advertised in SETTINGS and enforced on the HPACK-decoded size, so a small compressed block "
            "that expands (an HPACK bomb) is cut. A header block spread over CONTINUATION frames is also "
            "capped at this size compressed. Past it the connection ends with GOAWAY."
        ),
    )
    initial_window: Annotated[Size, Field(ge=65535, le=(1 << 31) - 1)] = Field(
        default="1MiB",
        validate_default=True,
        description=(
            "Flow-control window per stream for request bodies: the most a client may send on one stream "
            "before Fender (reading as the upstream takes it) opens the window again. The connection's "
            "window is 8 times this, so one slow stream never stalls the others; a connection buffers at "
            "most that much request body."
        ),
    )
    max_resets_per_second: Count = Field(
        default=100,
        ge=1,
        description=(
            "Streams a client may reset (RST_STREAM) per connection and second; beyond it the connection "
            "ends with GOAWAY ENHANCE_YOUR_CALM. Stops the Rapid Reset attack (CVE-2023-44487), where "
            "streams opened and cancelled at once make the server start work it never finishes."
        ),
    )
    max_control_frames_per_second: Count = Field(
        default=1000,
        ge=1,
        description=(
            "SETTINGS and PING frames a client may send per connection and second (each makes Fender "
            "answer); beyond it, or when their answers pile up unread, the connection ends with GOAWAY "
            "ENHANCE_YOUR_CALM (SETTINGS and PING floods)."
        ),
    )


class ServerOptions(PolicyModel):
    """Downstream (client-facing) limits of the data-path listener."""

    max_header_bytes: Annotated[Size, Field(gt=0)] = Field(
        default="32KiB",
        validate_default=True,
        description=(
            "Largest request head (request line plus all header lines) a client may send; larger heads "
            "get 431. 32KiB fits large cookies and tokens while bounding the memory one connection can pin."
        ),
    )
    max_header_count: Count = Field(
        default=100,
        ge=1,
        description="Most header fields one request may carry; more get 431. 100 is the common proxy default.",
    )
    keepalive_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="75s",
        validate_default=True,
        description=(
            "Idle client keep-alive connections are closed after this long. 75s outlives the 60s idle "
            "timeout of common load balancers, so they close first and never reuse a connection we just closed."
        ),
    )
    max_connections: Count = Field(
        default=2048,
        ge=1,
        description=(
            "Most concurrent client connections; beyond it new connections get 503 and are closed. "
            "Bounds memory and file descriptors under a connection flood."
        ),
    )
    access_log: Flag = Field(
        default=False,
        description=(
            "Write one line per proxied request to the access log (logger fender.access): status, route, "
            "replica, tries, cache status, the X-Fender-Error reason. Off by default: metrics cover the "
            "common questions."
        ),
    )
    access_log_format: Literal["text", "json"] = Field(
        default="text",
        description=(
            "text: key=value lines through the process's log format; json: one JSON object per line with "
            "fixed field names (time, client, method, target, status, route, upstream, replica, tries, "
            "cache, error, request_id, duration_ms), written bare to stderr for log shippers."
        ),
    )
    trusted_proxies: tuple[IpNetwork, ...] = Field(
        default=(),
        description=(
            "Networks (CIDR, e.g. 10.0.0.0/8) whose X-Forwarded-For header is believed when finding the "
            "client address. Empty by default: the TCP peer is the client."
        ),
    )
    trusted_hops: Count = Field(
        default=0,
        ge=0,
        le=16,
        description=(
            "Alternative to trusted_proxies when the proxies' addresses are not known: the number of proxies "
            "always in front of Fender (the TCP peer being the nearest), each appending to X-Forwarded-For. "
            "The client is then the address this many places from the right of X-Forwarded-For (the leftmost "
            "when there are fewer). 0 (default) believes no X-Forwarded-For. Use one of the two, not both."
        ),
    )

    @model_validator(mode="after")
    def _one_trust_rule(self) -> ServerOptions:
        if self.trusted_hops and self.trusted_proxies:
            raise policy_error(
                "give either trusted_proxies or trusted_hops, not both (they are two ways to say whom to believe)",
                "trusted_hops",
            )
        return self

    @model_validator(mode="after")
    def _request_line_within_head(self) -> ServerOptions:
        keep_ordered(
            self,
            "max_request_line",
            "max_header_bytes",
            f"max_request_line ({format_size(self.max_request_line)}) cannot exceed max_header_bytes "
            f"({format_size(self.max_header_bytes)}): the request line is part of the head, so a longer "
            "one would be cut by max_header_bytes (raise max_header_bytes as well)",
            "max_request_line",
            raise_high=False,  # a memory bound per connection is never raised behind the user's back
        )
        return self

    # Hardening (issue 9): request-head and connection limits enforced by FenderHttpProtocol.
    max_request_line: Annotated[Size, Field(gt=0)] = Field(
        default="8KiB",
        validate_default=True,
        description=(
            "Longest request target (the URL in the request line) a client may send; longer ones get 414 and "
            "the connection closes. 8KiB is NGINX's limit and fits every sane URL. Must not exceed "
            "max_header_bytes (the line is part of the head); a max_header_bytes written below 8KiB lowers "
            "this default to it."
        ),
    )
    header_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="10s",
        validate_default=True,
        description=(
            "Longest time from a connection opening (or the first byte of a further request on it) until the "
            "whole request head has arrived; past it the client gets 408 and the connection closes. Cuts "
            "slowloris clients that trickle headers to hold connections open."
        ),
    )
    max_requests_per_connection: Count = Field(
        default=1000,
        ge=1,
        description=(
            "Requests served on one client connection before Fender answers with Connection: close, so "
            "long-lived connections get rebalanced. 1000 is NGINX's keepalive_requests default."
        ),
    )
    headers_with_underscores: Literal["drop", "reject", "allow"] = Field(
        default="drop",
        description=(
            "What to do with request header names containing '_' (X_Forwarded_For), which some upstreams "
            "treat like '-': drop removes the field (NGINX's default), reject answers 400, allow forwards it."
        ),
    )
    send_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="60s",
        validate_default=True,
        description=(
            "Longest time a client may leave Fender's response unread (its socket buffer full); past it the "
            "connection is cut. Stops slow readers from pinning upstream connections. 60s as NGINX's send_timeout."
        ),
    )
    http2: Http2Options = Field(
        default_factory=Http2Options,
        description=(
            "HTTP/2 and its limits (h2c on the same port as HTTP/1.1, told apart by the connection "
            "preface). The other server limits apply as they do to HTTP/1.1: max_header_count and "
            "headers_with_underscores per stream, keepalive_timeout (an idle connection gets GOAWAY), "
            "send_timeout (a stream or connection whose window stays shut that long is cut), "
            "max_requests_per_connection (GOAWAY after that many streams), max_connections."
        ),
    )
    engine: Literal["uvicorn", "granian"] = Field(
        default="uvicorn",
        description=(
            "HTTP server of the data listener. uvicorn (default): uvicorn's server runs Fender's own HTTP/1.1 "
            "protocol, which enforces every request-head limit here (header_timeout, max_request_line, "
            "underscores, absolute-form refusal) and is the faster of the two; granian (Rust HTTP stack, "
            "`pip install fender[granian]`) enforces its own head limits (read timeout and buffer size from "
            "header_timeout and max_header_bytes). Read at start only."
        ),
    )
    tls: ListenerTLSOptions | None = Field(
        default=None,
        description=(
            "Serve HTTPS on the listen address: cert_file and key_file (rotated live when they change on "
            "disk), client certificates (client_ca_file, client_auth), min_version. The handshake counts "
            "inside header_timeout; plain HTTP sent to the port gets a 400. uvicorn engine only. Turning it "
            "on or off needs a restart. See docs/tls.md."
        ),
    )


# --------------------------------------------------------------------------- upstreams

_URL_HINT = "write it like http://127.0.0.1:9001"
_UNIX_HINT = "write it like unix:///run/app/gunicorn.sock"
# sun_path holds 108 bytes on Linux, the terminating NUL included (104 on the BSDs and macOS).
UNIX_PATH_MAX = 107


def _parse_unix_url(url: str) -> str:
    """Check a ``unix:///absolute/path`` replica URL and return the socket path."""
    rest = url[len("unix:") :]
    if not rest.startswith("//"):
        path = rest.lstrip("/")
        raise policy_error(
            f"{describe_value(url)}: a unix socket URL starts with unix:// and an absolute path "
            f"(write unix:///{path or 'run/app/gunicorn.sock'})"
        )
    path = rest[2:]
    if "?" in path or "#" in path:
        raise policy_error(f"{describe_value(url)}: a unix socket URL cannot have a query or fragment")
    if path in ("", "/"):
        raise policy_error(f"{describe_value(url)} has no socket path ({_UNIX_HINT})")
    if not path.startswith("/"):
        raise policy_error(
            f"{describe_value(url)}: the socket path {path!r} is relative; give an absolute path after "
            f"unix:// (three slashes in all: unix:///{path})"
        )
    if path.endswith("/"):
        raise policy_error(f"{describe_value(url)}: {path!r} names a directory, not a socket file")
    if "\x00" in path or any(c.isspace() for c in path):
        raise policy_error(f"{describe_value(url)}: the socket path cannot contain spaces or NUL bytes")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise policy_error(
            f"{describe_value(url)}: the socket path is {len(path.encode())} bytes long; the system allows "
            f"at most {UNIX_PATH_MAX}"
        )
    return path


def _parse_replica_url(url: str) -> tuple[str, int, str | None]:
    """Check a replica URL and return ``(host, port, unix_path)``; the host has no brackets.

    A ``unix://`` URL gives ``("", 0, path)``; an ``http://`` or ``https://`` one ``(host, port, None)``
    (port 80 or 443 when left out)."""
    if url[:5].lower() == "unix:":
        return "", 0, _parse_unix_url(url)
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise policy_error(f"{describe_value(url)} has no scheme: write http://{url.lstrip('/')}")
    scheme = scheme.lower()
    if scheme != "http" and scheme != "https":
        raise policy_error(
            f'{describe_value(url)}: only http://, https:// and unix:// URLs are supported, not "{scheme}://"'
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise policy_error(f"{describe_value(url)} is not a valid URL ({exc}; {_URL_HINT})") from None
    if "@" in parts.netloc:
        raise policy_error(
            f"{describe_value(url)}: user names and passwords are not allowed in a replica URL"
        )
    if parts.path not in ("", "/"):
        raise policy_error(
            f"{describe_value(url)}: a replica URL cannot have a path ({parts.path!r}); "
            "the request path is passed through unchanged"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise policy_error(f"{describe_value(url)}: a replica URL cannot have a query or fragment")
    netloc = parts.netloc
    if netloc.startswith("["):
        host_text, _, rest = netloc[1:].partition("]")
        try:
            host = str(ipaddress.IPv6Address(host_text))
        except ValueError:
            raise policy_error(f"{describe_value(url)}: {host_text!r} is not an IPv6 address") from None
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and not rest.startswith(":"):
            raise policy_error(f"{describe_value(url)} is not a valid URL ({_URL_HINT})")
    else:
        host_text, sep, port_text = netloc.rpartition(":")
        if not sep:
            host_text, port_text = netloc, None
        try:
            host = _check_host(host_text, "http://127.0.0.1:9001")
        except ValueError as exc:
            raise policy_error(f"{describe_value(url)}: {exc}") from None
    if port_text is None or port_text == "":
        if port_text == "":
            raise policy_error(f"{describe_value(url)}: the port is empty ({_URL_HINT})")
        return host, 443 if scheme == "https" else 80, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise policy_error(f"{describe_value(url)}: the port must be a number from 1 to 65535")
    return host, int(port_text), None


def _check_rewrite_host(value: Any) -> bool | str:
    """``true``/``false``, or a Host value: ``name``, ``name:port``, ``1.2.3.4[:port]``, ``[v6][:port]``."""
    if isinstance(value, bool):
        return value
    hint = "true, false, or a host like app.internal or app.internal:8000"
    if not isinstance(value, str):
        raise policy_error(f"expected {hint}, got {describe_value(value)}")
    if value.lower() in ("true", "false", "yes", "no", "on", "off"):
        raise policy_error(f"{describe_value(value)} is text here: write true or false without quotes")
    return check_host_port(value, "expected " + hint)


RewriteHost = Annotated[
    bool | str,
    PlainValidator(_check_rewrite_host),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "boolean"},
                {"type": "string", "examples": ["app.internal", "app.internal:8000"]},
            ]
        }
    ),
]
"""``rewrite_host``: a flag, or the Host value to send."""


class PoolOptions(PolicyModel):
    """Connection pool towards each replica of an upstream (the limits apply per replica)."""

    max_connections: Count = Field(
        default=100,
        ge=1,
        description=(
            "Most open connections to one replica; further requests wait for a free one (see max_pending). "
            "Protects the replica from connection storms."
        ),
    )
    max_keepalive: Count = Field(
        default=100,
        ge=0,
        description=(
            "Most idle connections kept open to one replica for reuse; extra idle ones are closed. Defaults to "
            "max_connections (as Envoy does): every connection a burst opened stays for reuse until idle_timeout "
            "closes it, so steady concurrency never pays for reconnects. 0 disables reuse. Cannot exceed "
            "max_connections."
        ),
    )
    connect_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="1s",
        validate_default=True,
        description=(
            "Deadline for the TCP connect to a replica; a slower connect counts as a failure of that replica. "
            "1s is far above a healthy connect on the same network."
        ),
    )
    idle_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="60s",
        validate_default=True,
        description=(
            "Idle pooled connections are closed after this long. Keep it below the upstream server's own "
            "keep-alive timeout so we never send on a connection it is closing."
        ),
    )
    max_pending: Count = Field(
        default=1000,
        ge=0,
        description=(
            "Most requests waiting for a free connection to one replica; beyond it requests fail fast with 503 "
            "instead of queueing. 0 means never wait."
        ),
    )

    max_concurrent_streams: Count = Field(
        default=100,
        ge=1,
        le=10000,
        description=(
            "With protocol: h2, most streams (requests in flight) on one connection to a replica; the "
            "replica's own SETTINGS_MAX_CONCURRENT_STREAMS lowers it. Another connection opens when every "
            "open one is full, up to max_connections. Unused with HTTP/1.1."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _default_keepalive(cls, data: Any) -> Any:
        # Not written: keep idle every connection max_connections allows (the schema's default of 100 is
        # max_connections' default). Only two values the user wrote can conflict.
        if isinstance(data, dict) and data.get("max_keepalive") is None:
            limit = data.get("max_connections")
            if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
                return {**data, "max_keepalive": limit}
        return data

    @model_validator(mode="after")
    def _keepalive_within_connections(self) -> PoolOptions:
        if self.max_keepalive > self.max_connections:
            raise policy_error(
                f"max_keepalive ({self.max_keepalive}) cannot exceed max_connections ({self.max_connections})",
                "max_keepalive",
            )
        return self


class Replica(PolicyModel):
    """One instance of an upstream service, or a name standing for several (``resolve: true``, ``srv:``)."""

    model_config = ConfigDict(
        **PolicyModel.model_config,
        json_schema_extra={"anyOf": [{"required": ["url"]}, {"required": ["srv"]}]},
    )

    url: Text | None = Field(
        default=None,
        description=(
            "Where the replica listens: http://HOST:PORT (port 80 if left out), https://HOST:PORT (TLS, "
            "port 443 if left out; see the upstream's tls block), or unix:///PATH for a unix socket "
            "(gunicorn, uwsgi; an absolute path). No path, query or user info. A host name is looked up "
            "with the dns: settings (cached for its TTL); with several addresses each connect tries them "
            "in order, each with its share of pool.connect_timeout. Give either url or srv."
        ),
        json_schema_extra={
            "pattern": "^(https?|unix)://",
            "examples": [
                "http://127.0.0.1:9001",
                "https://api.payments.example",
                "http://catalog.internal:8080",
                "unix:///run/app/gunicorn.sock",
            ],
        },
    )
    resolve: Flag = Field(
        default=False,
        description=(
            "true: every address the url's host name resolves to (A and AAAA) is a replica of its own, with "
            "this entry's priority and weight, named HOST:PORT (NAME); the set follows the name's TTL (see "
            "dns:). The Host sent upstream stays the url's. Off: the name is one replica."
        ),
    )
    srv: Text | None = Field(
        default=None,
        description=(
            "An SRV name (like _http._tcp.catalog.shop.svc.cluster.local): each target is resolved and each "
            "of its addresses is a replica on the target's port, the SRV priority as its priority (failover "
            "tier, lower first) and the SRV weight as its weight (at least 1, at most 1000). Instead of url."
        ),
        json_schema_extra={"examples": ["_http._tcp.catalog.shop.svc.cluster.local"]},
    )
    priority: Count = Field(
        default=0,
        ge=0,
        description=(
            "Failover tier: 0 is preferred. Traffic goes to the lowest-numbered tier that has healthy "
            "replicas; higher tiers are standbys. (An srv entry takes it from the SRV records.)"
        ),
    )
    weight: Count = Field(
        default=1,
        ge=1,
        le=1000,
        description=(
            "Share of traffic among the healthy replicas of the same priority, from 1 to 1000 (relative). "
            "(An srv entry takes it from the SRV records.)"
        ),
    )

    _host: str = PrivateAttr(default="")
    _port: int = PrivateAttr(default=0)
    _unix_path: str | None = PrivateAttr(default=None)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None:
            _parse_replica_url(url)
        return url

    @field_validator("srv")
    @classmethod
    def _check_srv(cls, name: str | None) -> str | None:
        if name is None:
            return None
        lowered = name.strip().lower()
        if not _valid_hostname(lowered) or "." not in lowered.rstrip("."):
            raise policy_error(
                f"{describe_value(name)} is not an SRV name (write it like _http._tcp.catalog.shop.svc.cluster.local)"
            )
        return lowered.rstrip(".")

    @model_validator(mode="after")
    def _one_way_to_find_it(self) -> Replica:
        if self.url is None and self.srv is None:
            raise policy_error(
                "a replica needs a url (write {url: http://127.0.0.1:9001}) or an srv name", "url"
            )
        if self.url is not None and self.srv is not None:
            raise policy_error("give either url or srv, not both", "srv")
        if self.srv is not None:
            written = [f for f in ("priority", "weight", "resolve") if f in self.model_fields_set]
            if written:
                raise policy_error(
                    f"an srv entry takes its priorities, weights and ports from the SRV records: remove "
                    f"{written[0]}",
                    written[0],
                )
        elif self.resolve:
            host, _, unix_path = _parse_replica_url(self.url)  # type: ignore[arg-type]
            if unix_path is not None:
                raise policy_error(
                    "resolve: true needs an http:// URL with a host name, not a unix socket", "resolve"
                )
            try:
                ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                raise policy_error(
                    f"resolve: true needs a host name to look up, and {host} is an IP address (remove resolve)",
                    "resolve",
                )
        return self

    def model_post_init(self, context: Any, /) -> None:
        if self.url is not None:
            self._host, self._port, self._unix_path = _parse_replica_url(self.url)

    @property
    def discovered(self) -> bool:
        """True for an entry that stands for the addresses of a name (resolve: true, or srv)."""
        return self.resolve or self.srv is not None

    @property
    def needs_lookup(self) -> bool:
        """True when connecting needs a DNS answer: a discovered entry or a url with a host name."""
        if self.discovered:
            return True
        if self._unix_path is not None:
            return False
        try:
            ipaddress.ip_address(self._host)
        except ValueError:
            return True
        return False

    @property
    def host(self) -> str:
        """Host to connect to (IPv6 without brackets, names lower-cased); "" for a unix socket or srv."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port to connect to; 0 for a unix socket (or an srv entry: the records give the ports)."""
        return self._port

    @property
    def unix_path(self) -> str | None:
        """The socket file of a ``unix://`` replica, else None."""
        return self._unix_path

    @property
    def tls(self) -> bool:
        """True for an ``https://`` replica."""
        return self.url is not None and self.url[:6].lower() == "https:"  # an srv entry has no url

    @property
    def name(self) -> str:
        """``host:port`` (IPv6 in brackets), or ``unix:PATH`` (nginx's spelling) for a unix socket,
        ``srv:NAME`` for an srv entry.

        The replica's name in metrics, logs, traces and the admin API (an entry with resolve: true
        or srv: names each address it gives ``address:port (name)``)."""
        if self.srv is not None:
            return f"srv:{self.srv}"
        if self._unix_path is not None:
            return f"unix:{self._unix_path}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    @property
    def address(self) -> str:
        """Where it connects: the same as :attr:`name` for a replica from the policy."""
        return self.name

    @property
    def source(self) -> str:
        """Where the replica came from, for the admin API and the status page."""
        return "policy"

    @property
    def authority(self) -> str:
        """The Host value a route with ``rewrite_host: true`` sends: ``host:port``, or ``localhost``
        for a unix socket (it has no host name; curl --unix-socket sends the same)."""
        return "localhost" if self._unix_path is not None else self.name


class Upstream(PolicyModel):
    """A service behind the proxy: its replicas and how to connect to them."""

    replicas: tuple[Replica, ...] = Field(
        description="The instances of this service; at least one. Each is written {url: http://HOST:PORT, priority: 0, weight: 1}.",
    )
    pool: PoolOptions = Field(
        default_factory=PoolOptions,
        description="Connection pool limits, applied to each replica separately.",
    )
    protocol: Literal["http1", "h2", "auto"] = Field(
        default="http1",
        description=(
            "What Fender speaks to the replicas: http1 (HTTP/1.1), h2 (HTTP/2: many requests multiplexed on "
            "one connection; needed for gRPC replicas; prior knowledge on cleartext, ALPN h2 to https:// "
            "replicas, where a replica that does not choose h2 is a tls_failure) or auto (HTTP/1.1 on "
            "cleartext; to https:// replicas ALPN offers h2 then http/1.1 and Fender speaks what the replica "
            "chooses). See docs/http2.md."
        ),
    )
    tls: UpstreamTLSOptions | None = Field(
        default=None,
        description=(
            "How the https:// replicas are spoken to: trust (ca_file), the name to verify (server_name), a "
            "client certificate (cert_file, key_file), min_version. Without it https:// replicas are verified "
            "against the system trust store and their own host names. See docs/tls.md."
        ),
    )

    # Replica selection and health sections (failover): balance, health_check,
    # outlier_detection, panic_threshold.

    # section: failover
    balance: Balance = Field(
        default="round_robin",
        description=(
            "How tries spread over the eligible replicas of the serving priority level, respecting weights: "
            "round_robin (smooth weighted), least_request (the less loaded of two random picks, Envoy's "
            "power of two choices) or random."
        ),
    )
    slow_start: Annotated[Duration | None, Field(gt=0, le=3600)] = Field(
        default=None, description=SLOW_START_DESCRIPTION
    )
    health_check: HealthCheckOptions | None = Field(
        default=None,
        description=(
            "Active health checks: probe each replica in the background. Off by default; without them a "
            "replica leaves rotation only by outlier detection or a Retry-After."
        ),
    )
    outlier_detection: OutlierDetectionOptions | None = Field(
        default=None,
        description=(
            "Passive health: eject replicas that fail real traffic in a row. Off by default (as in Envoy); "
            "write outlier_detection: {} for the defaults."
        ),
    )
    panic_threshold: Percent = Field(
        default="50%",
        validate_default=True,
        description=(
            "When every priority level has fewer eligible replicas than this share of its size, spread "
            "traffic over all replicas regardless of health (Envoy's healthy_panic_threshold) rather than "
            "overload the few left. 0% disables panic: with no eligible replica Fender answers 503 at once."
        ),
    )

    @field_validator("replicas")
    @classmethod
    def _replicas_distinct(cls, replicas: tuple[Replica, ...]) -> tuple[Replica, ...]:
        if not replicas:
            raise policy_error("an upstream needs at least one replica (write - url: http://127.0.0.1:9001)")
        seen: dict[str, int] = {}
        for index, replica in enumerate(replicas):
            if replica.name in seen:
                raise policy_error(
                    f"replica {replica.name} is listed twice (also replicas[{seen[replica.name]}])",
                    index,
                    "url",
                )
            seen[replica.name] = index
        return replicas

    @model_validator(mode="after")
    def _tls_for_https(self) -> Upstream:
        if self.tls is not None and not any(replica.tls for replica in self.replicas):
            raise policy_error(
                "tls applies to https:// replicas and this upstream has none (write the replicas as https://)",
                "tls",
            )
        return self


# --------------------------------------------------------------------------- routes


_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_method(value: str) -> str:
    method = value.upper()
    if method in KNOWN_METHODS:
        return method
    if not _TOKEN_RE.fullmatch(value):
        raise policy_error(
            f"{describe_value(value)} is not an HTTP method (allowed: {', '.join(KNOWN_METHODS)})"
        )
    close = difflib.get_close_matches(method, KNOWN_METHODS, n=1)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    raise policy_error(
        f"unknown HTTP method {describe_value(value)} ({hint}allowed: {', '.join(KNOWN_METHODS)})"
    )


Method = Annotated[
    str,
    Strict(),
    AfterValidator(_check_method),
    WithJsonSchema({"type": "string", "examples": list(KNOWN_METHODS)}),
]


_PATH_FIELDS = ("path_prefix", "path", "path_regex")


def _check_path(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith("/"):
        raise policy_error(f'{describe_value(value)} must start with "/"')
    if any(c in value for c in "?# \t"):
        raise policy_error(
            f"{describe_value(value)}: a path cannot contain spaces, ? or # (queries are not matched)"
        )
    return value


def _check_regex(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise policy_error(
            f"{describe_value(value)} is not a valid regular expression: {exc.msg}{where}"
        ) from None
    return value


def _check_match_host(value: str | None) -> str | None:
    if value is None:
        return None
    host = value.lower()
    bare = host[2:] if host.startswith("*.") else host
    if ":" in bare and not bare.startswith("["):
        raise policy_error(f"{describe_value(value)}: leave out the port (the port is ignored when matching)")
    if not _valid_hostname(bare):
        raise policy_error(
            f'{describe_value(value)} is not a host name (write api.example.com, or "*.example.com" for any subdomain)'
        )
    return host


# A protocol token of the Upgrade field (RFC 9110 7.8), without a version, lowercase.
UpgradeProtocol = Annotated[
    str,
    # Tokens compare case-insensitively (RFC 9110 7.8): "WebSocket" is accepted and kept as "websocket".
    AfterValidator(str.lower),
    Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$", json_schema_extra={"examples": ["websocket"]}),
]


class RouteMatch(PolicyModel):
    """Which requests a route takes; every condition given must hold (no path condition: every path)."""

    path_prefix: Annotated[Text | None, AfterValidator(_check_path)] = Field(
        default=None,
        json_schema_extra={"pattern": "^/"},
        description=(
            'Path must start with this (plain string prefix of the normalised path, so "/api" also '
            'matches "/apis"; write "/api/" to match the segment only). "/" when no path condition is given.'
        ),
    )
    path: Annotated[Text | None, AfterValidator(_check_path)] = Field(
        default=None,
        description="Path must equal this exactly (after normalisation, without the query string).",
        json_schema_extra={"pattern": "^/"},
    )
    path_regex: Annotated[Text | None, AfterValidator(_check_regex)] = Field(
        default=None,
        description="Path must fully match this Python regular expression (anchored at both ends).",
    )
    host: Annotated[Text | None, AfterValidator(_check_match_host)] = Field(
        default=None,
        description=(
            'Host header must equal this (case-insensitive, port ignored); "*.example.com" matches any '
            "subdomain of example.com. Any host when unset."
        ),
    )
    methods: tuple[Method, ...] = Field(
        default=(),
        description="Allowed request methods, e.g. [GET, HEAD]; empty means any method.",
    )
    headers: dict[HeaderName, Text] = Field(
        default_factory=dict,
        description="Request headers that must be present with exactly these values (names are case-insensitive).",
        json_schema_extra={"additionalProperties": False},
    )

    _regex: re.Pattern[str] | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _default_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and all(data.get(key) is None for key in _PATH_FIELDS):
            return {**data, "path_prefix": "/"}
        return data

    @field_validator("methods")
    @classmethod
    def _dedupe_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(methods))

    @field_validator("headers", mode="before")
    @classmethod
    def _headers_distinct(cls, headers: Any) -> Any:
        if isinstance(headers, dict):
            seen: dict[str, Any] = {}
            for name in headers:
                if isinstance(name, str):
                    if name.lower() in seen:
                        raise policy_error(
                            f'header "{name}" is given twice (also as "{seen[name.lower()]}"; names are case-insensitive)',
                            name,
                        )
                    seen[name.lower()] = name
        return headers

    @model_validator(mode="after")
    def _one_path_condition(self) -> RouteMatch:
        given = [key for key in _PATH_FIELDS if getattr(self, key) is not None]
        if len(given) > 1:
            raise policy_error(
                f"give only one of path, path_prefix and path_regex (found {' and '.join(given)})",
                given[1],
            )
        return self

    def model_post_init(self, context: Any, /) -> None:
        self._regex = re.compile(self.path_regex) if self.path_regex is not None else None

    @property
    def regex(self) -> re.Pattern[str] | None:
        """``path_regex`` compiled (use ``fullmatch``), or None."""
        return self._regex


class Route(PolicyModel):
    """Sends matching requests to an upstream, with deadlines and limits."""

    name: Name = Field(
        description="Unique route name (1 to 64 of a-z A-Z 0-9 _ . -); used in metrics, logs and the admin API.",
    )
    match: RouteMatch = Field(
        default_factory=RouteMatch,
        description="Conditions a request must meet; routes are tried in file order and the first match wins.",
    )
    upstream: Name = Field(description="Name of the upstream (under `upstreams:`) that serves this route.")
    timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="15s",
        validate_default=True,
        description=(
            "Deadline from receiving the request until the upstream's response head arrives (connect, send, "
            "wait, and any retries fit inside it); past it the client gets 504. 15s cuts off hung calls "
            "well before typical client timeouts."
        ),
    )
    idle_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="60s",
        validate_default=True,
        description=(
            "Longest silence allowed while a request or response body is streaming, either way; past it both "
            "connections are cut. Catches stalled peers without limiting long downloads."
        ),
    )
    max_body: Size = Field(
        default="1MiB",
        validate_default=True,
        description="Largest request body accepted; larger ones get 413. 0B means no limit. 1MiB suits JSON APIs.",
    )
    rewrite_host: RewriteHost = Field(
        default=False,
        description=(
            "false passes the client's Host header unchanged; true replaces it with the chosen replica's "
            "host:port (localhost for a unix-socket replica); a name (app.internal, or app.internal:8000) is "
            "sent as the Host to every replica (for upstreams that route on Host)."
        ),
    )

    rewrite_prefix: Annotated[Text | None, AfterValidator(_check_path)] = Field(
        default=None,
        json_schema_extra={"pattern": "^/"},
        description=(
            "Replace the matched `match.path_prefix` with this before the request goes upstream (nginx "
            "`proxy_pass http://x/`, Envoy `prefix_rewrite`): prefix `/svc-a/` with `rewrite_prefix: /` sends "
            "`/svc-a/items` as `/items`. The result is normalised again (never `..` or `//`); the cache key, "
            "logs and metrics keep the client's path. Only on a route with `match.path_prefix`."
        ),
    )
    upgrades: tuple[UpgradeProtocol, ...] = Field(
        default=("websocket",),
        description=(
            "Protocols a client may switch to on this route (`Connection: upgrade` with `Upgrade:`): the request "
            "passes the route's admission (rate limit, breaker, bulkhead; never the cache; retries only before "
            "the upstream answers) to one replica, whose `101 Switching Protocols` opens a tunnel carrying bytes "
            "both ways. `[]` refuses upgrades here with 403 `upgrade_not_allowed`. `Upgrade: h2c` is always "
            "ignored (served as HTTP/1.1)."
        ),
    )
    upgrade_idle_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="1h",
        validate_default=True,
        description="A tunnel with no byte either way for this long is closed (both connections).",
    )

    @model_validator(mode="after")
    def _rewrite_needs_prefix(self) -> Route:
        if self.rewrite_prefix is not None and self.match.path_prefix is None:
            raise policy_error(
                "rewrite_prefix replaces the matched path_prefix: give match.path_prefix on this route "
                "(or remove rewrite_prefix)",
                "rewrite_prefix",
            )
        return self

    # Per-route policy sections. Each is an optional field whose options model
    # lives in its own package under proxy/policies/; absent means off.
    # (One anchor per section, so work on different sections merges cleanly.)

    # section: rate_limit
    rate_limit: RateLimits | None = Field(
        default=None,
        description=(
            "Rate limits for this route: one limit, or a list of limits that all apply (e.g. per client and "
            "per route). A limited request gets 429 with Retry-After and never reaches the upstream. Off when absent."
        ),
    )

    # section: bulkhead
    bulkhead: BulkheadOptions | None = Field(
        default=None,
        description=(
            "Caps the requests of this route in flight upstream, with a bounded FIFO queue; beyond it requests "
            "get 503 at once, without touching the upstream. Off when absent."
        ),
    )

    # section: adaptive_concurrency
    adaptive_concurrency: AdaptiveConcurrencyOptions | None = Field(
        default=None,
        description=(
            "A concurrency limit that follows the upstream's latency (a gradient, as Netflix's Gradient2), "
            "with a short LIFO queue beyond it; a request that gets no slot in time is answered 503 "
            "concurrency_limited. Off when absent."
        ),
    )

    # section: retry
    retry: RetryOptions | None = Field(
        default=None,
        description="Retry failed tries with backoff, within the route's timeout and a retry budget. Absent: no retries.",
    )

    # section: hedge
    hedge: HedgeOptions | None = Field(
        default=None,
        description=(
            "Hedged requests: when a try has not answered after the route's observed p95 (or a fixed delay), "
            "send one more to another replica; the first answer wins and the other is cancelled. Only for "
            "requests a retry could resend (idempotent or with an Idempotency-Key, replayable body), within "
            "a hedge budget, the retry budget and the deadline. Absent: off."
        ),
    )

    # section: circuit_breaker
    circuit_breaker: BreakerOptions | None = Field(
        default=None,
        description="Stop calling the upstream while it keeps failing, then probe it (Resilience4j semantics). Absent: off.",
    )

    # section: cache
    cache: CacheOptions | None = Field(
        default=None,
        description=(
            "Shared HTTP cache (RFC 9111) for GET/HEAD: serves fresh stored responses, revalidates stale ones, "
            "coalesces concurrent misses, serves stale on upstream failure when allowed. Absent: no caching."
        ),
    )

    # section: fault
    fault: FaultOptions | None = Field(
        default=None,
        description=(
            "Fault injection for chaos drills: delay or abort some of this route's tries in the upstream's place, "
            "so retries, the breaker and the cache meet them as real faults; switchable through "
            "`POST /admin/routes/NAME/fault`. Absent: off."
        ),
    )

    # section: explain and deadline propagation
    propagate_deadline: Flag = Field(
        default=True,
        description=(
            "Send the time left before this route's deadline upstream as Fender-Deadline-Ms, so a Fender in front "
            "of the upstream stops working on the request when the caller has given up. A request that carries "
            "the header always has its own deadline shortened to it."
        ),
    )
    explain: Flag = Field(
        default=False,
        description=(
            "Add a Fender-Trace header to every response of this route listing the decisions taken (breaker, "
            "tries, backoff, ...). Without it, a request from 127.0.0.1/::1 or server.trusted_proxies can ask "
            "with Fender-Explain: 1."
        ),
    )


# --------------------------------------------------------------------------- root


def _version_check(value: int) -> int:
    if value != 1:
        raise policy_error(f"unsupported policy version {value} (this Fender reads version 1)")
    return value


class Policy(PolicyModel):
    """A complete Fender policy: listeners, upstream services and routes."""

    version: Annotated[Count, AfterValidator(_version_check)] = Field(
        default=1,
        description="Policy file format version. Only 1 exists; later formats will be migrated from it.",
        json_schema_extra={"const": 1},
    )
    listen: ListenAddress = Field(
        default="127.0.0.1:8080",
        validate_default=True,
        description=(
            "host:port of the data-path listener that clients send requests to. 127.0.0.1 keeps it local to "
            "the pod/host (sidecar); use 0.0.0.0 to accept remote clients."
        ),
    )
    admin: ListenAddress = Field(
        default="127.0.0.1:9901",
        validate_default=True,
        description=(
            "host:port of the admin listener (health, metrics, admin API). Local-only by default; beyond "
            "loopback Fender requires admin_auth (a bearer token for /admin/*) and refuses to start without it."
        ),
    )
    server: ServerOptions = Field(
        default_factory=ServerOptions,
        description="Limits on client connections and requests.",
    )
    upstreams: dict[Name, Upstream] = Field(
        description="The services behind the proxy, by name; at least one.",
        json_schema_extra={"minProperties": 1, "additionalProperties": False},
    )
    routes: tuple[Route, ...] = Field(
        description="Routes, tried in file order; the first whose match holds takes the request. At least one.",
        json_schema_extra={"minItems": 1},
    )

    # Top-level sections owned by other modules.

    # section: cache store
    cache: CacheStoreOptions = Field(
        default_factory=CacheStoreOptions,
        description="The in-memory store shared by every route with a `cache:` section (size bounds, LRU).",
    )

    # section: dns
    dns: DnsOptions = Field(
        default_factory=DnsOptions,
        description=(
            "How replicas given by name are looked up: name servers, timeout, TTL bounds, how many addresses "
            "a name may give, how long a name that stopped existing keeps its last answer. Used by entries "
            "with resolve: true or srv:, and by plain host names in replica URLs."
        ),
    )

    # section: checkpoint and drain
    reload: ReloadOptions = Field(
        default_factory=ReloadOptions,
        description="Hot reload of this file (watching, SIGHUP, POST /admin/reload) and automatic rollback.",
    )
    drain: DrainOptions = Field(
        default_factory=DrainOptions,
        description="Graceful shutdown on SIGTERM: how long to keep serving after /readyz turns 503, and how long to wait for in-flight requests.",
    )
    checkpoint: CheckpointOptions | None = Field(
        default=None,
        description="Save breaker states and replica health to a file periodically and at shutdown, and restore them at start. Off when absent.",
    )
    admin_auth: AdminAuthOptions | None = Field(
        default=None,
        description="Bearer token required on /admin/* endpoints (not on /healthz, /readyz, /metrics). Fender refuses to start with an admin listener beyond loopback without it.",
    )
    admin_tls: ListenerTLSOptions | None = Field(
        default=None,
        description=(
            "Serve the admin listener over HTTPS (the same block as server.tls; the files are watched and "
            "rotated live). A non-loopback admin listener still needs admin_auth. Read at start."
        ),
    )

    # section: shared (Redis fleet tier)
    state: StateOptions = Field(
        default_factory=StateOptions,
        description=(
            "Where state shared by a fleet of sidecars lives: memory (each sidecar alone, the default) or "
            "redis (a shared cache tier, fleet-wide invalidations, rate limits with scope: global)."
        ),
    )

    # section: tracing
    tracing: TracingOptions | None = Field(
        default=None,
        description=(
            "Distributed tracing: continue W3C Trace Context, export a span per request and per try over "
            "OTLP/HTTP. Off when absent (traceparent then passes through untouched)."
        ),
    )

    # Values read from environment variables that hold secrets (by the variable's or the key's name);
    # set by the loader, so the admin output can show them as *** wherever they ended up.
    _env_secrets: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @property
    def env_secrets(self) -> frozenset[str]:
        return self._env_secrets

    @model_validator(mode="after")
    def _global_limits_need_redis(self) -> Policy:
        if self.state.backend == "redis":
            return self
        for index, route in enumerate(self.routes):
            for limit in route.rate_limit or ():
                if limit.scope == "global":
                    raise policy_error(
                        f'route "{route.name}": rate limit "{limit.name}" has scope: global, which needs '
                        "shared state (add state: {backend: redis, redis: {url: redis://host:6379/0}})",
                        "routes",
                        index,
                        "rate_limit",
                    )
        return self

    @field_validator("upstreams")
    @classmethod
    def _some_upstreams(cls, upstreams: dict[str, Upstream]) -> dict[str, Upstream]:
        if not upstreams:
            raise policy_error(
                "at least one upstream is needed (write e.g. catalog: {replicas: [{url: http://127.0.0.1:9001}]})"
            )
        return upstreams

    @field_validator("routes")
    @classmethod
    def _some_routes(cls, routes: tuple[Route, ...]) -> tuple[Route, ...]:
        if not routes:
            raise policy_error("at least one route is needed (write e.g. - {name: all, upstream: catalog})")
        return routes

    @model_validator(mode="after")
    def _cross_checks(self) -> Policy:
        problems: list[tuple[tuple[str | int, ...], str]] = []

        if self.listen.overlaps(self.admin):
            where = "admin" if "admin" in self.model_fields_set else "listen"
            problems.append(
                (
                    (where,),
                    f"listen ({self.listen}) and admin ({self.admin}) would bind the same port; "
                    "give them different ports",
                )
            )

        if self.server.tls is not None and self.server.engine == "granian":
            problems.append(
                (
                    ("server", "tls"),
                    "server.tls needs the uvicorn engine (granian's HTTPS is not wired up): remove "
                    "server.engine: granian",
                )
            )

        if self.admin_auth is None and not is_loopback(self.admin.host):
            problems.append(
                (
                    ("admin",),
                    f"the admin listener {self.admin} is reachable beyond this host, but no admin token is "
                    "configured: add admin_auth: {token_env: NAME} (or token_file), or bind admin to 127.0.0.1",
                )
            )

        first_seen: dict[str, int] = {}
        for index, route in enumerate(self.routes):
            if route.name in first_seen:
                problems.append(
                    (
                        ("routes", index, "name"),
                        f'duplicate route name "{route.name}" (already used by routes[{first_seen[route.name]}])',
                    )
                )
            else:
                first_seen[route.name] = index
            if route.upstream not in self.upstreams:
                close = difflib.get_close_matches(route.upstream, list(self.upstreams), n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                problems.append(
                    (
                        ("routes", index, "upstream"),
                        f'unknown upstream "{route.upstream}" ({hint}defined upstreams: {", ".join(self.upstreams)})',
                    )
                )

        # A retry budget shared per upstream has one set of settings: the routes sharing it agree.
        shared_budget: dict[str, tuple[int, Any]] = {}
        for index, route in enumerate(self.routes):
            budget = route.retry.budget if route.retry is not None else None
            if budget is None or budget.scope != "upstream":
                continue
            first, settings = shared_budget.setdefault(route.upstream, (index, budget))
            if settings != budget:
                problems.append(
                    (
                        ("routes", index, "retry", "budget"),
                        f'routes[{first}] ("{self.routes[first].name}") shares upstream "{route.upstream}"\'s '
                        "retry budget (scope: upstream) with other settings: give both the same ratio, "
                        "min_per_second and window (or scope: route)",
                    )
                )

        if problems:
            raise _many_errors(problems)
        return self

    def upstream_for(self, route: Route) -> Upstream:
        """The upstream a route sends to (always present in a validated policy)."""
        return self.upstreams[route.upstream]


def _many_errors(problems: list[tuple[tuple[str | int, ...], str]]) -> PydanticCustomError:
    """One pydantic error carrying several located problems (the loader reports each one)."""
    if len(problems) == 1:
        at, message = problems[0]
        return policy_error(message, *at)
    lines = [f"{'.'.join(map(str, at))}: {message}" for at, message in problems]
    return PydanticCustomError(
        "fender_policy",
        "{reason}",
        {"reason": "; ".join(lines), "fender_issues": [(list(at), message) for at, message in problems]},
    )


def dump_policy(policy: Policy) -> dict[str, Any]:
    """The effective policy (defaults filled in) as plain data in policy-file notation.

    Durations come out as ``"2s"``, sizes as ``"1MiB"``, addresses as
    ``"127.0.0.1:8080"``; parsing the result again gives an equal policy.
    """
    return policy.model_dump(mode="json")
