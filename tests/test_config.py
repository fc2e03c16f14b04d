"""The policy file: unit types, models, YAML loading with line/column errors, JSON Schema."""

from __future__ import annotations

import ipaddress
import json
import re
from textwrap import dedent

import pytest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from proxy.config import (
    Duration,
    ListenAddress,
    Percent,
    Policy,
    PolicyError,
    PolicyIssue,
    Rate,
    RateValue,
    Size,
    dump_policy,
    dump_policy_yaml,
    format_duration,
    format_path,
    format_percent,
    format_rate,
    format_size,
    load_policy,
    parse_policy,
    policy_json_schema,
    schema_text,
)
from proxy.options.units import parse_duration, parse_percent, parse_rate, parse_size


def problems(text: str) -> list[str]:
    """Parse YAML that must fail; return the issues as printed lines."""
    with pytest.raises(PolicyError) as info:
        parse_policy(dedent(text), "policy.yaml")
    return [str(issue) for issue in info.value.issues]


def problem(text: str) -> str:
    """Parse YAML that must fail with exactly one issue; return it as printed."""
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# A minimal valid policy; tests that need one more line write their own YAML.
MINIMAL = """\
upstreams:
  catalog:
    replicas:
      - url: http://127.0.0.1:9001
routes:
  - name: catalog
    upstream: catalog
"""


# =========================================================================== units


class Units(BaseModel):
    """A throwaway model using every unit type (no Policy field uses Rate/Percent yet)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
    duration: Duration = "1s"
    size: Size = "1KiB"
    rate: Rate = "1/s"
    percent: Percent = "1%"


def unit_error(**values: object) -> str:
    with pytest.raises(ValidationError) as info:
        Units(**values)
    errors = info.value.errors()
    assert len(errors) == 1, errors
    return errors[0]["msg"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("0ms", 0.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("0.5ms", 0.0005),
        ("1.25h", 4500.0),
        ("100ms", 0.1),
    ],
)
def test_duration_good(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert Units(duration=text).duration == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2, "2 is a bare number, not a duration (add a unit: write 2s or 2ms)"),
        (1.5, "1.5 is a bare number, not a duration"),
        (-1, "a duration is 0s or more"),
        ("3", '"3" is not a duration (add a unit: write 3s or 3ms)'),
        ("-1s", "a duration cannot be negative"),
        ("2d", "days are not supported; write 48h"),
        ("500us", "the smallest unit is ms"),
        ("2S", "units are lower case: write 2s"),
        ("2 seconds", "write 2s"),
        ("2x", "unknown unit 'x'"),
        ("", '"" is not a duration (write it like 250ms, 2s or 1m)'),
        ("1e3ms", "is not a duration"),
        (True, "expected a duration like 250ms, 2s or 1m, got true"),
        (None, "got nothing (null)"),
    ],
)
def test_duration_bad(value: object, message: str) -> None:
    assert message in unit_error(duration=value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (0.0005, "0.5ms"),
        (1.5, "1.5s"),
        (2, "2s"),
        (60, "1m"),
        (90, "90s"),
        (7200, "2h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "seconds", [0.001, 0.0015, 0.1, 0.3, 1 / 3, 2.5, 59.999, 61.5, 3599, 1e-7, 123456.789, 86400 * 365]
)
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0B", 0),
        ("512B", 512),
        ("64KiB", 65536),
        ("1.5KiB", 1536),
        ("256MiB", 256 * 1024**2),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("1KB", 1000),
        ("10MB", 10_000_000),
        ("1GB", 10**9),
        ("0.5KB", 500),
    ],
)
def test_size_good(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert Units(size=text).size == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (512, "512 is a bare number, not a size (add a unit: write 512B or 512KiB)"),
        ("512", "add a unit: write 512B or 512KiB"),
        ("64kib", "units are case-sensitive: write 64KiB"),
        ("64K", "write 64KiB (powers of 1024) or 64KB (powers of 1000)"),
        ("1.3B", "is not a whole number of bytes"),
        ("-1KiB", "a size cannot be negative"),
        ("1PiB", "unknown unit 'PiB'"),
        (False, "expected a size like 512B"),
    ],
)
def test_size_bad(value: object, message: str) -> None:
    assert message in unit_error(size=value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (1024, "1KiB"),
        (1536, "1536B"),
        (1000, "1KB"),
        (1048576, "1MiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "count", "per_seconds", "per_second"),
    [
        ("100/s", 100, 1.0, 100.0),
        ("6000/m", 6000, 60.0, 100.0),
        ("10/h", 10, 3600.0, 10 / 3600),
        ("5/10s", 5, 10.0, 0.5),
        ("1/500ms", 1, 0.5, 2.0),
    ],
)
def test_rate_good(text: str, count: int, per_seconds: float, per_second: float) -> None:
    rate = parse_rate(text)
    assert rate == RateValue(count=count, per_seconds=per_seconds)
    assert rate.per_second == pytest.approx(per_second)
    assert Units(rate=text).rate == rate
    assert parse_rate(format_rate(rate)) == rate


def test_rate_is_frozen_and_formats() -> None:
    rate = RateValue(count=100, per_seconds=1.0)
    with pytest.raises(AttributeError):
        rate.count = 5  # type: ignore[misc]
    assert str(rate) == "100/s"
    assert format_rate(RateValue(6000, 60.0)) == "6000/m"
    assert format_rate(RateValue(5, 10.0)) == "5/10s"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (100, "100 is a bare number, not a rate (add a period: write 100/s or 100/m)"),
        ("100", '"100" is not a rate (write it like 100/s, 6000/m or 10/h)'),
        ("0/s", "the count must be at least 1"),
        ("1.5/s", "the count must be a whole number"),
        ("100/sec", "write 100/s"),
        ("100/minute", "write 100/m"),
        ("100/d", "days are not supported; write 100/24h"),
        ("100/0s", "the period must be longer than 0s"),
        ("-1/s", "a rate cannot be negative"),
    ],
)
def test_rate_bad(value: object, message: str) -> None:
    assert message in unit_error(rate=value)


@pytest.mark.parametrize(
    ("text", "fraction"),
    [("0%", 0.0), ("50%", 0.5), ("12.5%", 0.125), ("100%", 1.0), ("7%", 0.07), ("0.01%", 0.0001)],
)
def test_percent_good(text: str, fraction: float) -> None:
    assert parse_percent(text) == fraction
    assert Units(percent=text).percent == fraction
    assert format_percent(fraction) == text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("101%", '"101%" is out of range (a percentage is between 0% and 100%)'),
        ("100.5%", "is out of range"),
        ("-1%", "is out of range"),
        (0.5, "0.5 is a bare number, not a percentage (add a percent sign, write it like 50% or 12.5%)"),
        ("50", '"50" is not a percentage'),
        ("half", "is not a percentage"),
    ],
)
def test_percent_bad(value: object, message: str) -> None:
    assert message in unit_error(percent=value)


def test_units_dump_in_policy_notation() -> None:
    units = Units(duration="1500ms", size="65536B", rate="6000/m", percent="12.5%")
    assert units.model_dump(mode="json") == {
        "duration": "1.5s",
        "size": "64KiB",
        "rate": "6000/m",
        "percent": "12.5%",
    }
    assert units.model_dump() == units.model_dump(mode="json")
    assert (units.duration, units.size, units.rate, units.percent) == (
        1.5,
        65536,
        RateValue(6000, 60.0),
        0.125,
    )
    assert Units.model_validate(units.model_dump(mode="json")) == units
    assert Units.model_validate(units.model_dump()) == units


@pytest.mark.parametrize("unit_type", [Duration, Size, Rate, Percent])
def test_unit_json_schema_is_a_pattern_string(unit_type: object) -> None:
    schema = TypeAdapter(unit_type).json_schema()
    assert schema["type"] == "string"
    pattern = re.compile(schema["pattern"])
    assert schema["examples"]
    adapter = TypeAdapter(unit_type)
    for example in schema["examples"]:
        assert pattern.search(example), example
        adapter.validate_python(example)
        # what we print back is valid under the schema too
        assert pattern.search(adapter.dump_python(adapter.validate_python(example), mode="json"))
    assert not pattern.search("2")


def test_unit_bounds_are_reported_in_unit_notation() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
            pool:
              connect_timeout: 0s
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == (
        'policy.yaml:6:24: upstreams.catalog.pool.connect_timeout: must be greater than 0s, got "0s"'
    )


# =========================================================================== a valid policy

FULL = """\
version: 1
listen: 0.0.0.0:8080
admin: 127.0.0.1:9901
server:
  max_header_bytes: 16KiB
  keepalive_timeout: 30s
  access_log: true
  trusted_proxies: [10.0.0.0/8, "fd00::/8", 192.168.1.7]
upstreams:
  catalog:
    replicas:
      - {url: http://127.0.0.1:9001, priority: 0, weight: 3}
      - url: http://catalog_standby.internal
        priority: 1
    pool: {max_connections: 10, connect_timeout: 250ms}
  search:
    replicas:
      - url: "http://[::1]:9002/"
routes:
  - name: catalog-read
    match:
      path_prefix: /catalog
      methods: [get, HEAD]
      headers: {X-Env: prod}
      host: "*.Example.com"
    upstream: catalog
    timeout: 3s
    max_body: 0B
  - name: search
    match: {path_regex: "/search/[a-z]+"}
    upstream: search
    rewrite_host: true
  - name: fallback
    upstream: catalog
"""


def test_full_policy_loads_with_defaults_filled_in() -> None:
    policy = parse_policy(FULL, "policy.yaml")
    assert policy.version == 1
    assert policy.listen == ListenAddress(host="0.0.0.0", port=8080)
    assert policy.listen.is_wildcard
    assert (policy.admin.host, policy.admin.port) == ("127.0.0.1", 9901)

    server = policy.server
    assert server.max_header_bytes == 16 * 1024
    assert server.max_header_count == 100
    assert server.keepalive_timeout == 30.0
    assert server.max_connections == 2048
    assert server.access_log is True
    assert server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )

    catalog = policy.upstreams["catalog"]
    first, standby = catalog.replicas
    assert (first.host, first.port, first.name, first.priority, first.weight) == (
        "127.0.0.1",
        9001,
        "127.0.0.1:9001",
        0,
        3,
    )
    assert (standby.host, standby.port, standby.name, standby.priority, standby.weight) == (
        "catalog_standby.internal",
        80,
        "catalog_standby.internal:80",
        1,
        1,
    )
    pool = catalog.pool
    assert (pool.max_connections, pool.max_keepalive, pool.connect_timeout) == (10, 10, 0.25)
    assert (pool.idle_timeout, pool.max_pending) == (60.0, 1000)
    search = policy.upstreams["search"].replicas[0]
    assert (search.host, search.port, search.name) == ("::1", 9002, "[::1]:9002")
    assert policy.upstreams["search"].pool.max_keepalive == 100  # follows max_connections

    read, search_route, fallback = policy.routes
    assert read.match.path_prefix == "/catalog"
    assert read.match.methods == ("GET", "HEAD")
    assert read.match.headers == {"x-env": "prod"}
    assert read.match.host == "*.example.com"
    assert (read.timeout, read.idle_timeout, read.max_body, read.rewrite_host) == (3.0, 60.0, 0, False)
    assert search_route.match.path_prefix is None
    assert search_route.match.regex is not None
    assert search_route.match.regex.fullmatch("/search/abc")
    assert search_route.rewrite_host is True
    assert fallback.match.path_prefix == "/"
    assert fallback.match.regex is None
    assert (fallback.timeout, fallback.max_body) == (15.0, 1024 * 1024)
    assert policy.upstream_for(fallback) is catalog


def test_minimal_policy_defaults() -> None:
    policy = parse_policy(MINIMAL)
    assert str(policy.listen) == "127.0.0.1:8080"
    assert str(policy.admin) == "127.0.0.1:9901"
    assert policy.server.trusted_proxies == ()
    assert policy.server.max_header_bytes == 32 * 1024
    assert policy.server.keepalive_timeout == 75.0
    assert policy.routes[0].match.methods == ()


def test_dump_uses_policy_notation() -> None:
    dumped = dump_policy(parse_policy(FULL))
    assert dumped["listen"] == "0.0.0.0:8080"
    assert dumped["server"]["max_header_bytes"] == "16KiB"
    assert dumped["server"]["keepalive_timeout"] == "30s"
    assert dumped["server"]["trusted_proxies"] == ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]
    assert dumped["upstreams"]["catalog"]["pool"]["connect_timeout"] == "250ms"
    assert dumped["routes"][0]["max_body"] == "0B"
    assert dumped["routes"][2]["timeout"] == "15s"
    assert dumped["routes"][2]["max_body"] == "1MiB"
    assert json.loads(json.dumps(dumped)) == dumped


@pytest.mark.parametrize("text", [FULL, MINIMAL])
def test_dump_round_trips(text: str) -> None:
    policy = parse_policy(text)
    yaml_text = dump_policy_yaml(policy)
    assert "timeout: 15s" in yaml_text
    assert parse_policy(yaml_text) == policy
    assert Policy.model_validate(dump_policy(policy)) == policy
    assert dump_policy(parse_policy(yaml_text)) == dump_policy(policy)


def test_policy_is_immutable() -> None:
    policy = parse_policy(MINIMAL)
    with pytest.raises(ValidationError):
        policy.listen = ListenAddress(host="127.0.0.1", port=1)  # type: ignore[misc]
    with pytest.raises(ValidationError):
        policy.routes[0].timeout = 1.0  # type: ignore[misc]


def test_listen_addresses() -> None:
    assert ListenAddress.model_validate("[::1]:8080") == ListenAddress(host="::1", port=8080)
    assert str(ListenAddress.model_validate("[::]:80")) == "[::]:80"
    assert ListenAddress.model_validate("LocalHost:0").host == "localhost"
    zero = ListenAddress.model_validate("127.0.0.1:0")
    assert not zero.overlaps(zero)  # port 0 = pick a free port: never a clash
    wildcard = ListenAddress.model_validate("[::]:8080")
    assert wildcard.overlaps(ListenAddress.model_validate("10.1.2.3:8080"))
    assert not ListenAddress.model_validate("127.0.0.1:8080").overlaps(
        ListenAddress.model_validate("127.0.0.2:8080")
    )


def test_load_policy_from_file(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_policy(path) == parse_policy(MINIMAL)
    assert load_policy(str(path)).routes[0].name == "catalog"


# =========================================================================== mistakes, with positions


def test_unknown_top_level_key() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
        rootes: []
        """
    )
    assert found.startswith(
        'policy.yaml:8:1: rootes: unknown key "rootes" (did you mean "routes"? allowed: version,'
    )


def test_unknown_nested_key_suggests_the_right_one() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
            timeot: 3s
        """
    )
    assert found.startswith(
        'policy.yaml:8:5: routes[0].timeot: unknown key "timeot" (did you mean "timeout"?'
    )
    assert "allowed: name, match, upstream, timeout, idle_timeout, max_body, rewrite_host" in found


def test_unknown_key_in_flow_mapping() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
            pool: {max_conections: 5}
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found.startswith(
        'policy.yaml:5:12: upstreams.catalog.pool.max_conections: unknown key "max_conections" '
        '(did you mean "max_connections"?'
    )


def test_string_for_an_integer() -> None:
    found = problems(
        """\
        server:
          max_connections: lots
          max_header_count: "100"
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == [
        'policy.yaml:2:20: server.max_connections: expected a whole number, got "lots"',
        'policy.yaml:3:21: server.max_header_count: expected a whole number, got text "100" '
        "(write it without quotes: 100)",
    ]


def test_bad_duration() -> None:
    found = problems(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
          - name: other
            upstream: catalog
            idle_timeout: 2sec
            timeout: "3"
        """
    )
    assert found == [
        'policy.yaml:10:19: routes[1].idle_timeout: "2sec" is not a duration (write 2s)',
        'policy.yaml:11:14: routes[1].timeout: "3" is not a duration (add a unit: write 3s or 3ms)',
    ]


def test_bare_number_duration() -> None:
    found = problem(
        """\
        server:
          keepalive_timeout: 75
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == (
        "policy.yaml:2:22: server.keepalive_timeout: 75 is a bare number, not a duration "
        "(add a unit: write 75s or 75ms)"
    )


def test_bad_size() -> None:
    found = problem(
        """\
        server:
          max_header_bytes: 64kb
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == (
        'policy.yaml:2:21: server.max_header_bytes: "64kb" is not a size (units are case-sensitive: write 64KB)'
    )


def test_bad_rate_and_percent_in_a_model() -> None:
    with pytest.raises(ValidationError) as info:
        Units(rate="100/day", percent="150%")
    messages = {error["loc"]: error["msg"] for error in info.value.errors()}
    assert messages[("rate",)] == '"100/day" is not a rate (days are not supported; write 100/24h)'
    assert messages[("percent",)] == '"150%" is out of range (a percentage is between 0% and 100%)'


def test_bad_rate_and_percent_located_by_the_loader() -> None:
    """Later sections (rate limits, breakers) get the same positions through the generic mapping."""

    class Section(BaseModel):
        model_config = ConfigDict(extra="forbid", validate_default=True)
        rate: Rate = Field(default="1/s")
        share: Percent = Field(default="1%")

    from proxy.config.loader import _issues_from, _read_yaml

    data, index = _read_yaml("rate: 100 per second\nshare: 0.5\n", "section.yaml")
    with pytest.raises(ValidationError) as info:
        Section.model_validate(data)
    found = [str(issue) for issue in _issues_from(info.value, index, "section.yaml")]
    assert found == [
        'section.yaml:1:7: rate: "100 per second" is not a rate (write 100/s)',
        "section.yaml:2:8: share: 0.5 is a bare number, not a percentage (add a percent sign, write it like 50% or 12.5%)",
    ]


def test_route_names_a_missing_upstream() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
          search:
            replicas:
              - url: http://127.0.0.1:9002
        routes:
          - name: catalog
            upstream: catalogue
        """
    )
    assert found == (
        'policy.yaml:10:15: routes[0].upstream: unknown upstream "catalogue" '
        '(did you mean "catalog"? defined upstreams: catalog, search)'
    )


def test_duplicate_route_name() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
          - upstream: catalog
            name: catalog
        """
    )
    assert (
        found
        == 'policy.yaml:9:11: routes[1].name: duplicate route name "catalog" (already used by routes[0])'
    )


def test_listen_and_admin_on_the_same_port() -> None:
    found = problem(
        """\
        listen: 0.0.0.0:8080
        admin: 127.0.0.1:8080
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found.startswith("policy.yaml:2:8: admin: listen (0.0.0.0:8080) and admin (127.0.0.1:8080)")
    assert "same port" in found


def test_listen_clashing_with_the_default_admin_points_at_listen() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        listen: 127.0.0.1:9901
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found.startswith("policy.yaml:5:9: listen: listen (127.0.0.1:9901) and admin (127.0.0.1:9901)")


def test_same_port_on_different_hosts_is_fine() -> None:
    policy = parse_policy("listen: 127.0.0.1:9000\nadmin: 127.0.0.2:9000\n" + MINIMAL)
    assert policy.listen.port == policy.admin.port


def test_bad_url_schemes() -> None:
    found = problems(
        """\
        upstreams:
          catalog:
            replicas:
              - url: https://127.0.0.1:9001/v1
              - url: ftp://127.0.0.1:9002
              - {url: "127.0.0.1:9003"}
              - url: http://127.0.0.1:9004/api
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == [
        'policy.yaml:4:14: upstreams.catalog.replicas[0].url: "https://127.0.0.1:9001/v1": '
        "a replica URL cannot have a path ('/v1'); the request path is passed through unchanged",
        'policy.yaml:5:14: upstreams.catalog.replicas[1].url: "ftp://127.0.0.1:9002": '
        'only http://, https:// and unix:// URLs are supported, not "ftp://"',
        'policy.yaml:6:15: upstreams.catalog.replicas[2].url: "127.0.0.1:9003" has no scheme: '
        "write http://127.0.0.1:9003",
        'policy.yaml:7:14: upstreams.catalog.replicas[3].url: "http://127.0.0.1:9004/api": '
        "a replica URL cannot have a path ('/api'); the request path is passed through unchanged",
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://user:pw@host:1", "user names and passwords are not allowed"),
        ("http://host:1?x=1", "cannot have a query or fragment"),
        ("http://host:99999", "the port must be a number from 1 to 65535"),
        ("http://host:", "the port is empty"),
        ("http://ho st:1", "is not a valid host name or IP address"),
        ("http://[nope]:1", "is not a valid URL"),
        ("http://[::1]x:1", "is not a valid URL"),
        ("http://:1", "the host is missing"),
    ],
)
def test_bad_replica_urls(url: str, message: str) -> None:
    found = problem(
        f"""\
        upstreams:
          catalog:
            replicas:
              - url: "{url}"
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found.startswith("policy.yaml:4:14: upstreams.catalog.replicas[0].url: ")
    assert message in found


def test_replica_listed_twice() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
              - url: http://127.0.0.1:9001/
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == (
        "policy.yaml:5:14: upstreams.catalog.replicas[1].url: replica 127.0.0.1:9001 is listed twice "
        "(also replicas[0])"
    )


def test_bad_regex() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
            match:
              path_regex: "/items/(\\\\d+"
        """
    )
    assert found == (
        'policy.yaml:9:19: routes[0].match.path_regex: "/items/(\\\\d+" is not a valid regular expression: '
        "missing ), unterminated subpattern at position 7"
    )


def test_two_path_conditions() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
            match:
              path_prefix: /catalog
              path: /catalog/items
        """
    )
    assert found == (
        "policy.yaml:10:13: routes[0].match.path: give only one of path, path_prefix and path_regex "
        "(found path_prefix and path)"
    )


def test_duplicate_yaml_key() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
            timeout: 2s
            timeout: 3s
        """
    )
    assert found == (
        'policy.yaml:9:5: duplicate key "timeout" (a key may appear only once in a mapping; remove or merge one of them)'
    )


def test_yaml_syntax_error() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas: [{url: http://127.0.0.1:9001}
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found.startswith("policy.yaml:4:1: invalid YAML: ")
    assert "while parsing a flow sequence started at line 3, column 15" in found


def test_tab_indentation() -> None:
    found = problem("upstreams:\n\tcatalog: {}\n")
    assert found.startswith(
        "policy.yaml:2:1: invalid YAML: found character '\\t' that cannot start any token"
    )
    assert found.endswith("indent with spaces, not tabs")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(text: str) -> None:
    assert problem(text) == (
        "policy.yaml:1:1: the policy is empty; it needs at least an `upstreams:` and a `routes:` section"
    )


def test_top_level_not_a_mapping() -> None:
    assert problem("- listen: 127.0.0.1:8080\n").startswith(
        "policy.yaml:1:1: the top level must be a mapping of keys (listen:, upstreams:, routes:, ...), got a list"
    )
    assert problem("just text\n").endswith('got "just text"')


def test_missing_required_key() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            timeout: 2s
        """
    )
    assert found == 'policy.yaml:6:5: routes[0].upstream: missing required key "upstream"'


def test_missing_top_level_sections() -> None:
    assert problems("listen: 127.0.0.1:8080\n") == [
        'policy.yaml:1:1: upstreams: missing required key "upstreams"',
        'policy.yaml:1:1: routes: missing required key "routes"',
    ]


def test_negative_priority_and_weight_out_of_range() -> None:
    found = problems(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
                priority: -1
                weight: 1001
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == [
        "policy.yaml:5:19: upstreams.catalog.replicas[0].priority: must be at least 0, got -1",
        "policy.yaml:6:17: upstreams.catalog.replicas[0].weight: must be at most 1000, got 1001",
    ]


def test_empty_sections() -> None:
    found = problems(
        """\
        upstreams: {}
        routes: []
        """
    )
    assert found == [
        "policy.yaml:1:12: upstreams: at least one upstream is needed "
        "(write e.g. catalog: {replicas: [{url: http://127.0.0.1:9001}]})",
        "policy.yaml:2:9: routes: at least one route is needed (write e.g. - {name: all, upstream: catalog})",
    ]


def test_upstream_without_replicas() -> None:
    found = problems(
        """\
        upstreams:
          catalog:
            replicas: []
          search:
            replicas:
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == [
        "policy.yaml:3:15: upstreams.catalog.replicas: an upstream needs at least one replica "
        "(write - url: http://127.0.0.1:9001)",
        "policy.yaml:5:5: upstreams.search.replicas: expected a list, got nothing (null)",
    ]


def test_bad_names() -> None:
    found = problems(
        """\
        upstreams:
          my catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: ""
            upstream: catalog
        """
    )
    assert found == [
        'policy.yaml:2:3: upstreams["my catalog"]: "my catalog" is not a valid name '
        '(use 1 to 64 letters, digits, "_", "." or "-")',
        'policy.yaml:6:11: routes[0].name: a name cannot be empty (use 1 to 64 letters, digits, "_", "." or "-")',
    ]


def test_match_mistakes() -> None:
    found = problems(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
            match:
              path_prefix: catalog
              methods: [GET, FETCH, "B@D", gett]
              host: api.example.com:8443
              headers:
                X-Version: 2
                Bad Header: x
        """
    )
    assert found == [
        'policy.yaml:9:20: routes[0].match.path_prefix: "catalog" must start with "/"',
        'policy.yaml:10:22: routes[0].match.methods[1]: unknown HTTP method "FETCH" (did you mean "PATCH"? allowed: GET, HEAD, POST, '
        "PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT)",
        'policy.yaml:10:29: routes[0].match.methods[2]: "B@D" is not an HTTP method (allowed: GET, HEAD, POST, '
        "PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT)",
        'policy.yaml:10:36: routes[0].match.methods[3]: unknown HTTP method "gett" (did you mean "GET"? '
        "allowed: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT)",
        'policy.yaml:11:13: routes[0].match.host: "api.example.com:8443": leave out the port '
        "(the port is ignored when matching)",
        'policy.yaml:13:20: routes[0].match.headers.X-Version: expected text, got the number 2 (put it in quotes: "2")',
        'policy.yaml:14:9: routes[0].match.headers["Bad Header"]: "Bad Header" is not a valid header name',
    ]


def test_methods_given_as_a_single_string() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
            match: {methods: GET}
        """
    )
    assert (
        found == 'policy.yaml:8:22: routes[0].match.methods: expected a list, got "GET" (write it as [GET])'
    )


def test_server_mistakes() -> None:
    found = problems(
        """\
        listen: 8080
        admin: "::1:9901"
        server:
          access_log: yes
          trusted_proxies: [10.0.0.1/8, nonsense]
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == [
        "policy.yaml:1:9: listen: 8080 is only a port; write 127.0.0.1:8080 (or 0.0.0.0:8080 for all interfaces)",
        'policy.yaml:2:8: admin: "::1:9901": write IPv6 addresses in brackets, like [::1]:8080 or [::]:8080',
        'policy.yaml:4:15: server.access_log: expected true or false, got "yes"',
        'policy.yaml:5:21: server.trusted_proxies[0]: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)',
        'policy.yaml:5:33: server.trusted_proxies[1]: "nonsense" is not an IP network '
        "(write it like 10.0.0.0/8, fd00::/8 or 192.168.1.7)",
    ]


def test_keepalive_above_connections() -> None:
    found = problem(
        """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
            pool:
              max_connections: 50
              max_keepalive: 60
        routes:
          - name: catalog
            upstream: catalog
        """
    )
    assert found == (
        "policy.yaml:7:22: upstreams.catalog.pool.max_keepalive: max_keepalive (60) cannot exceed "
        "max_connections (50)"
    )


def test_unsupported_version() -> None:
    found = problem("version: 2\n" + MINIMAL)
    assert found == "policy.yaml:1:10: version: unsupported policy version 2 (this Fender reads version 1)"


def test_section_given_as_a_scalar() -> None:
    found = problems(
        """\
        server: fast
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - catalog
        """
    )
    assert found == [
        'policy.yaml:1:9: server: expected a mapping (key: value lines), got "fast"',
        'policy.yaml:7:5: routes[0]: expected a mapping (key: value lines), got "catalog"',
    ]


def test_several_issues_in_file_order_and_error_text() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(
            dedent(
                """\
                upstreams:
                  catalog:
                    replicas:
                      - url: http://127.0.0.1:9001
                routes:
                  - name: a
                    upstream: nowhere
                  - name: a
                    upstream: catalog
                """
            ),
            "policy.yaml",
        )
    error = info.value
    assert [(issue.line, issue.col) for issue in error.issues] == [(7, 15), (8, 11)]
    first = error.issues[0]
    assert isinstance(first, PolicyIssue)
    assert (first.source, first.path) == ("policy.yaml", "routes[0].upstream")
    assert first.message == 'unknown upstream "nowhere" (defined upstreams: catalog)'
    assert str(error) == "\n".join(str(issue) for issue in error.issues)
    assert str(error).splitlines()[1] == (
        'policy.yaml:8:11: routes[1].name: duplicate route name "a" (already used by routes[0])'
    )


def test_unreadable_file(tmp_path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    (issue,) = info.value.issues
    assert (issue.line, issue.col) == (0, 0)
    assert str(issue) == f"{missing}: cannot read the policy file: No such file or directory"
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    assert "cannot read the policy file" in str(info.value)


def test_file_errors_name_the_file_and_bad_encoding(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL + "bogus: 1\n", encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}:8:1: bogus: unknown key")
    path.write_bytes(b"upstreams:\n  caf\xe9: {}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}:2:6: the policy file is not valid UTF-8 text"


def test_format_path() -> None:
    assert format_path(["routes", 1, "timeout"]) == "routes[1].timeout"
    assert format_path(["upstreams", "a.b", "replicas", 0, "url"]) == 'upstreams["a.b"].replicas[0].url'
    assert format_path([]) == ""


# =========================================================================== JSON Schema


def test_json_schema_header_and_text() -> None:
    schema = policy_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://fender.dev/schema/policy.json"
    assert schema["title"] == "Fender policy"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"upstreams", "routes"}
    text = schema_text()
    assert text.endswith("}\n")
    assert json.loads(text) == schema
    assert text == schema_text()  # stable


def test_json_schema_shows_units_and_defaults_in_policy_notation() -> None:
    schema = policy_json_schema()
    route = schema["$defs"]["Route"]["properties"]
    assert route["timeout"]["default"] == "15s"
    assert route["timeout"]["type"] == "string"
    assert re.search(route["timeout"]["pattern"], "250ms")
    assert route["max_body"]["default"] == "1MiB"
    assert schema["properties"]["listen"]["default"] == "127.0.0.1:8080"
    assert schema["$defs"]["ListenAddress"]["type"] == "string"


def _walk_properties(schema: dict, where: str = ""):
    for name, prop in schema.get("properties", {}).items():
        yield f"{where}{name}", prop
    for def_name, definition in schema.get("$defs", {}).items():
        yield from _walk_properties(definition, f"{def_name}.")


def test_every_field_is_documented() -> None:
    for where, prop in _walk_properties(policy_json_schema()):
        description = prop.get("description", "")
        assert len(description) > 20, f"{where} needs a description"


# =========================================================================== YAML corner cases


def test_keys_must_be_text() -> None:
    assert problems(
        """\
        1: x
        upstreams:
          null: {}
        """
    ) == [
        'policy.yaml:1:1: keys must be text, got 1 (put it in quotes: "1")',
        "policy.yaml:3:3: upstreams: keys must be text, got nothing (null)",
    ]


def test_merge_keys_and_aliases_work_and_keep_positions() -> None:
    text = """\
        upstreams:
          catalog:
            replicas:
              - url: http://127.0.0.1:9001
        routes:
          - &base {name: catalog, upstream: catalog, timeout: 2s}
          - <<: *base
            name: second
            timeot: 1s
        """
    assert problem(text).startswith('policy.yaml:9:5: routes[1].timeot: unknown key "timeot"')
    policy = parse_policy(dedent(text).replace("timeot: 1s", "max_body: 2MiB"))
    assert [(route.name, route.timeout, route.max_body) for route in policy.routes] == [
        ("catalog", 2.0, 1024 * 1024),
        ("second", 2.0, 2 * 1024 * 1024),
    ]


def test_alias_expansion_is_bounded() -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for depth in range(1, 7):
        name, previous = chr(97 + depth), chr(96 + depth)
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]")
    found = problems("\n".join(levels) + "\n")
    assert len(found) == 1
    assert "the policy is too large (more than 200000 values after aliases)" in found[0]


def test_absurd_numbers_are_refused_not_crashed() -> None:
    assert "is too long to be a duration" in unit_error(duration="1" + "0" * 400 + "h")
    assert "the period is too long" in unit_error(rate="1/1" + "0" * 400 + "h")


def test_dates_are_not_durations() -> None:
    found = problem("server: {keepalive_timeout: 2024-01-01}\n" + MINIMAL)
    assert (
        found
        == "policy.yaml:1:29: server.keepalive_timeout: expected a duration like 250ms, 2s or 1m, got a date"
    )


# --------------------------------------------------------------------------- defaults give way

# (where the section goes, the value written alone, the other key, what that key becomes, both written
# in conflict, the message). The section text is indented under an upstream, a route, or the top level.
GIVE_WAY = [
    (
        "upstream",
        "health_check: {interval: 500ms}",
        lambda p: p.upstreams["catalog"].health_check.timeout,
        0.5,
        "health_check: {interval: 500ms, timeout: 2s}",
        "timeout (2s) cannot exceed interval (500ms)",
    ),
    (
        "upstream",
        "health_check: {timeout: 5s}",
        lambda p: p.upstreams["catalog"].health_check.interval,
        5.0,
        "health_check: {interval: 1s, timeout: 2s}",
        "timeout (2s) cannot exceed interval (1s)",
    ),
    (
        "upstream",
        "outlier_detection: {ejection_time: 10m}",
        lambda p: p.upstreams["catalog"].outlier_detection.max_ejection_time,
        600.0,
        "outlier_detection: {ejection_time: 10m, max_ejection_time: 1m}",
        "max_ejection_time (1m) cannot be shorter than ejection_time (10m)",
    ),
    (
        "route",
        "circuit_breaker: {open_for: 10m}",
        lambda p: p.routes[0].circuit_breaker.max_open_for,
        600.0,
        "circuit_breaker: {open_for: 10m, max_open_for: 1m}",
        "max_open_for (1m) cannot be shorter than open_for (10m)",
    ),
    (
        "route",
        "retry: {backoff: {initial: 2s}}",
        lambda p: p.routes[0].retry.backoff.max,
        2.0,
        "retry: {backoff: {initial: 2s, max: 1s}}",
        "max (1s) cannot be shorter than initial (2s)",
    ),
    (
        "route",
        "retry: {backoff: {max: 10ms}}",
        lambda p: p.routes[0].retry.backoff.initial,
        0.01,
        "retry: {backoff: {initial: 20ms, max: 10ms}}",
        "max (10ms) cannot be shorter than initial (20ms)",
    ),
    (
        "top",
        "cache: {max_size: 4MiB}",
        lambda p: p.cache.max_object_size,
        4 * 1024 * 1024,
        "cache: {max_size: 4MiB, max_object_size: 8MiB}",
        "cache.max_object_size (8MiB) cannot be larger than cache.max_size (4MiB)",
    ),
    (
        "top",
        "server: {max_header_bytes: 4KiB}",
        lambda p: p.server.max_request_line,
        4096,
        "server: {max_header_bytes: 32KiB, max_request_line: 64KiB}",
        "max_request_line (64KiB) cannot exceed max_header_bytes (32KiB)",
    ),
]


def _with_section(where: str, section: str) -> str:
    upstream = f"\n    {section}" if where == "upstream" else ""
    route = f"\n    {section}" if where == "route" else ""
    top = f"{section}\n" if where == "top" else ""
    return (
        f"{top}upstreams:\n  catalog:\n    replicas: [{{url: http://127.0.0.1:9001}}]{upstream}\n"
        f"routes:\n  - name: catalog\n    upstream: catalog{route}\n"
    )


@pytest.mark.parametrize(("where", "alone", "derived", "value", "both", "message"), GIVE_WAY)
def test_a_default_gives_way_to_what_the_user_wrote(where, alone, derived, value, both, message) -> None:
    policy = parse_policy(_with_section(where, alone), "policy.yaml")
    assert derived(policy) == pytest.approx(value)
    # The effective policy, dumped and read again, is the same policy (the derived value written out).
    assert parse_policy(dump_policy_yaml(policy)) == policy
    # Only two values the user wrote can conflict; the error is at one of them and names both.
    found = problem(_with_section(where, both))
    assert message in found
    line = 1 if where == "top" else (4 if where == "upstream" else 7)
    assert found.startswith(f"policy.yaml:{line}:")


def test_a_memory_bound_is_never_raised_to_fit_a_written_value() -> None:
    found = problem(_with_section("top", "cache: {max_object_size: 100MiB}"))
    assert found == (
        "policy.yaml:1:26: cache.max_object_size: cache.max_object_size (100MiB) cannot be larger than "
        "cache.max_size (64MiB)"
    )


def test_max_request_line_above_max_header_bytes_names_both() -> None:
    found = problem(
        MINIMAL
        + """\
server:
  max_request_line: 64KiB
"""
    )
    assert found == (
        "policy.yaml:9:21: server.max_request_line: max_request_line (64KiB) cannot exceed "
        "max_header_bytes (32KiB): the request line is part of the head, so a longer one would be cut by "
        "max_header_bytes (raise max_header_bytes as well)"
    )


def test_an_error_inside_a_one_limit_rate_limit_points_at_the_value_not_a_union_branch():
    text = dedent(
        """
        upstreams:
          a:
            replicas: [{url: http://127.0.0.1:9}]
        routes:
          - name: r
            upstream: a
            rate_limit:
              rate: 100 per second
        """
    )
    with pytest.raises(PolicyError) as refused:
        parse_policy(text, "p.yaml")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "100 per second" in t)
    col = text.splitlines()[line - 1].index("100") + 1
    assert str(refused.value).splitlines()[0].startswith(f"p.yaml:{line}:{col}: routes[0].rate_limit.rate: ")
