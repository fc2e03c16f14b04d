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


def compile_match(match) -> Matcher:
    """Build one closure from a RouteMatch model."""
    checks: list[Callable[[str, bytes, bytes, list], bool]] = []

    if match.path is not None:
        exact = match.path.encode()
        checks.append(lambda m, h, p, hd: p == exact)
    elif match.path_regex is not None:
        pattern = re.compile(match.path_regex.encode())
        checks.append(lambda m, h, p, hd: pattern.fullmatch(p) is not None)
    else:
        prefix = (match.path_prefix or "/").encode()
        if prefix != b"/":
            checks.append(lambda m, h, p, hd: p.startswith(prefix))

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
        return lambda m, h, p, hd: True
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)
    return lambda m, h, p, hd: all(check(m, h, p, hd) for check in frozen)


class Router(Generic[T]):
    """First match in file order wins; None means no route (Fender's 404)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[tuple[Matcher, T]]) -> None:
        self._entries = tuple(entries)

    def match(self, method: str, host: bytes, path: bytes, headers: list) -> T | None:
        for matcher, target in self._entries:
            if matcher(method, host, path, headers):
                return target
        return None
