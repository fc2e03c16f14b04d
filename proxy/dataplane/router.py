"""Route matching, compiled once when the policy loads.

Routes are tried in file order and the first whose every condition holds
wins. Each route's conditions become one small closure so the request path
runs no configuration logic: only the checks the route actually has.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

# (method, host without port, lower-case; normalised path; raw header pairs) -> bool
Matcher = Callable[[str, bytes, bytes, list], bool]


def host_without_port(host: bytes | None) -> bytes:
    if not host:
        return b""
    host = host.lower()
    if host.startswith(b"["):  # IPv6 literal: [::1]:8080
        end = host.find(b"]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(b":")
    return host[:colon] if colon != -1 else host


class PathPrefix:
    """A route whose path condition is a prefix: the Router tests the prefix itself, in its loop.

    Most routes are a path prefix and little else; testing it without a call per
    route keeps matching cheap as routes are added. ``rest`` holds the route's
    other conditions (None when it has none).
    """

    __slots__ = ("prefix", "rest")

    def __init__(self, prefix: bytes, rest: Matcher | None) -> None:
        self.prefix = prefix
        self.rest = rest

    def __call__(self, m: str, h: bytes, p: bytes, hd: list) -> bool:
        return p.startswith(self.prefix) and (self.rest is None or self.rest(m, h, p, hd))


def compile_match(match) -> Matcher:
    """Build one closure from a RouteMatch model (a PathPrefix when the path condition is a prefix)."""
    checks: list[Callable[[str, bytes, bytes, list], bool]] = []
    prefix: bytes | None = None

    if match.path is not None:
        exact = match.path.encode()
        checks.append(lambda m, h, p, hd: p == exact)
    elif match.path_regex is not None:
        pattern = re.compile(match.path_regex.encode())
        checks.append(lambda m, h, p, hd: pattern.fullmatch(p) is not None)
    else:
        prefix = (match.path_prefix or "/").encode()  # every normalised path starts with "/"

    if match.methods:
        methods = frozenset(match.methods)
        checks.append(lambda m, h, p, hd: m in methods)

    if match.host:
        wanted = match.host.lower().encode()
        if wanted.startswith(b"*."):
            suffix = wanted[1:]
            checks.append(lambda m, h, p, hd: h.endswith(suffix) and len(h) > len(suffix))
        else:
            checks.append(lambda m, h, p, hd: h == wanted)

    if match.headers:
        required = tuple((name.lower().encode(), value.encode()) for name, value in match.headers.items())

        def headers_match(m, h, p, hd, required=required) -> bool:
            for name, value in required:
                for have_name, have_value in hd:
                    if have_name == name and have_value == value:
                        break
                else:
                    return False
            return True

        checks.append(headers_match)

    if not checks:
        rest = None
    elif len(checks) == 1:
        rest = checks[0]
    else:
        frozen = tuple(checks)
        rest = lambda m, h, p, hd: all(check(m, h, p, hd) for check in frozen)  # noqa: E731
    if prefix is not None:
        return PathPrefix(prefix, rest)
    assert rest is not None  # an exact path or a regex is always one check
    return rest


class Router(Generic[T]):
    """First match in file order wins; None means no route (Fender's 404)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[tuple[Matcher, T]]) -> None:
        # (prefix or None, matcher or None, target): a PathPrefix is unpacked so its prefix is
        # tested inline and its other conditions (if any) only once the prefix matched.
        self._entries = tuple(
            (matcher.prefix, matcher.rest, target)
            if isinstance(matcher, PathPrefix)
            else (None, matcher, target)
            for matcher, target in entries
        )

    def match(self, method: str, host: bytes, path: bytes, headers: list) -> T | None:
        for prefix, matcher, target in self._entries:
            if prefix is not None and not path.startswith(prefix):
                continue
            if matcher is None or matcher(method, host, path, headers):
                return target
        return None
