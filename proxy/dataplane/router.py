"""Route matching, compiled once when the policy loads.

Routes are tried in file order and the first whose every condition holds
wins. Each route's conditions become one small closure so the request path
runs no configuration logic: only the checks the route actually has.

Two routers keep that meaning. `Router` scans the routes in order (cheapest
for a few routes). `IndexedRouter`, for larger policies, finds the routes
whose path condition can hold from a table built at load: an exact path is
one dict lookup, the path prefixes are a sorted table searched by bisection,
and a regex is filed under the literal bytes it starts with. Only those
candidates are tried, still in file order, so a route whose method, host or
header condition fails falls through to the next one exactly as in the scan.
`build_router` picks one by route count.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

# (method, host without port, lower-case; normalised path; raw header pairs) -> bool
Matcher = Callable[[str, bytes, bytes, list], bool]

# From this many routes on, build_router indexes them. Measured with timeit: a request to the first
# route costs the scan ~0.14 us and the index ~0.24 us whatever the count; the scan's mean over the
# routes passes the index's (~0.18 us) at 3-4 routes. Below 6 the scan is kept: its worst case stays
# under half a microsecond and a policy's first routes (often its busiest) stay cheapest.
INDEX_FROM_ROUTES = 6
# An index holds, per key, the routes that may match under it: a bound on the total (pointers,
# 8 bytes each) so a pathological policy (thousands of nested conditional prefixes) gets the scan.
MAX_INDEX_CELLS = 1_000_000


def host_without_port(host: bytes | None) -> bytes:
    if not host:
        return b""
    host = host.lower()
    if host.startswith(b"["):  # IPv6 literal: [::1]:8080
        end = host.find(b"]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(b":")
    return host[:colon] if colon != -1 else host


PREFIX, EXACT, REGEX = "prefix", "exact", "regex"


class CompiledMatch:
    """A route's conditions, with its path condition kept apart for the routers.

    ``kind`` is PREFIX, EXACT or REGEX; ``path`` the prefix, the exact path, or
    the literal bytes every full match of the regex starts with (b"" when none
    is known). ``rest`` holds the route's other conditions (None when it has
    none); ``check`` is every condition, path included, as one closure.
    """

    __slots__ = ("check", "kind", "path", "rest")

    def __init__(self, kind: str, path: bytes, rest: Matcher | None, check: Matcher) -> None:
        self.kind = kind
        self.path = path
        self.rest = rest
        self.check = check

    def __call__(self, m: str, h: bytes, p: bytes, hd: list) -> bool:
        return self.check(m, h, p, hd)


_REGEX_SPECIAL = frozenset(b".^$*+?{}[]\\|()")
_REGEX_QUANTIFIERS = frozenset(b"*+?{")


def regex_literal_prefix(pattern: bytes) -> bytes:
    """Bytes every full match of `pattern` starts with; conservative (b"" when not sure).

    The pattern's leading run of ordinary bytes, minus the last one when a
    quantifier follows it (``/ab?`` only promises ``/a``). Any ``|`` gives b"":
    an alternation at the top level would offer other starts. Inline flags such
    as ``(?i)`` can only stand at the start (Python 3.11), where they end the run.
    """
    if b"|" in pattern:
        return b""
    end = 0
    while end < len(pattern) and pattern[end] not in _REGEX_SPECIAL:
        end += 1
    if end < len(pattern) and pattern[end] in _REGEX_QUANTIFIERS:
        end -= 1
    return pattern[: max(end, 0)]


def _all_of(checks: list[Matcher]) -> Matcher | None:
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)
    return lambda m, h, p, hd: all(check(m, h, p, hd) for check in frozen)


def compile_match(match) -> CompiledMatch:
    """Build a route's matcher from a RouteMatch model."""
    others: list[Matcher] = []
    if match.methods:
        methods = frozenset(match.methods)
        others.append(lambda m, h, p, hd: m in methods)

    if match.host:
        wanted = match.host.lower().encode()
        if wanted.startswith(b"*."):
            suffix = wanted[1:]
            others.append(lambda m, h, p, hd: h.endswith(suffix) and len(h) > len(suffix))
        else:
            others.append(lambda m, h, p, hd: h == wanted)

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

        others.append(headers_match)

    rest = _all_of(others)
    if match.path is not None:
        exact = match.path.encode()
        check = _all_of([lambda m, h, p, hd: p == exact, *others])
        assert check is not None  # of a list that is not empty
        return CompiledMatch(EXACT, exact, rest, check)
    if match.path_regex is not None:
        source = match.path_regex.encode()
        pattern = re.compile(source)
        check = _all_of([lambda m, h, p, hd: pattern.fullmatch(p) is not None, *others])
        assert check is not None  # of a list that is not empty
        return CompiledMatch(REGEX, regex_literal_prefix(source), rest, check)
    prefix = (match.path_prefix or "/").encode()  # every normalised path starts with "/"
    return CompiledMatch(
        PREFIX, prefix, rest, lambda m, h, p, hd: p.startswith(prefix) and (rest is None or rest(m, h, p, hd))
    )


class Router(Generic[T]):
    """Every route in file order, first match wins; None means no route (Fender's 404).

    The cheapest router for a few routes: one tuple per route, and a path
    prefix (most routes have one and little else) tested inline, without a call.
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[tuple[Matcher, T]]) -> None:
        # (prefix or None, matcher or None, target): a prefix route is unpacked so its prefix is
        # tested inline and its other conditions (if any) only once the prefix matched.
        self._entries = tuple(
            (matcher.path, matcher.rest, target)
            if isinstance(matcher, CompiledMatch) and matcher.kind == PREFIX
            else (None, matcher.check if isinstance(matcher, CompiledMatch) else matcher, target)
            for matcher, target in entries
        )

    def match(self, method: str, host: bytes, path: bytes, headers: list) -> T | None:
        for prefix, matcher, target in self._entries:
            if prefix is not None and not path.startswith(prefix):
                continue
            if matcher is None or matcher(method, host, path, headers):
                return target
        return None


class IndexTooLarge(Exception):
    """The index would hold more than MAX_INDEX_CELLS route references."""


class IndexedRouter(Generic[T]):
    """First match in file order among the routes the path index leaves; None means no route.

    Every route is filed under a key: an exact path under that path (``exact``),
    a prefix under the prefix, a regex under its literal prefix, anything else
    under b"" (``keys``, sorted). For each key the index holds, in file order,
    the routes that may match a path under it, each with the conditions still to
    test (None: nothing left, the route matches). A path's routes are those of
    its longest key: every key that is a prefix of the path is a prefix of that
    one. The longest key is found by bisection: the greatest key <= path, else
    the longest key that is a prefix of that one (``parents``) and so on.
    """

    __slots__ = ("_exact", "_keys", "_parents", "_tables")

    def __init__(self, entries: Sequence[tuple[Matcher, T]], max_cells: int = MAX_INDEX_CELLS) -> None:
        exact_routes: dict[bytes, list[int]] = {}
        keyed_routes: dict[bytes, list[int]] = {}
        cells: list[tuple[Matcher | None, T]] = []
        for index, (matcher, target) in enumerate(entries):
            if not isinstance(matcher, CompiledMatch):  # a matcher the index knows nothing about
                keyed_routes.setdefault(b"", []).append(index)
                cells.append((matcher, target))
            elif matcher.kind == EXACT:
                exact_routes.setdefault(matcher.path, []).append(index)
                cells.append((matcher.rest, target))
            elif matcher.kind == PREFIX:
                keyed_routes.setdefault(matcher.path, []).append(index)
                cells.append((matcher.rest, target))
            else:  # a regex: its literal prefix only narrows, the whole pattern is still tested
                keyed_routes.setdefault(matcher.path, []).append(index)
                cells.append((matcher.check, target))

        keys = sorted(keyed_routes)
        parents: list[int] = []
        for position, key in enumerate(keys):
            # The longest proper prefix of a key sorts before it, on the previous key's chain; the
            # keys walked past are on no later chain, so building this is linear in the key count.
            parent = position - 1
            while parent >= 0 and not key.startswith(keys[parent]):
                parent = parents[parent]
            parents.append(parent)
        self._keys = keys
        self._parents = tuple(parents)

        budget = max_cells

        def table(own: list[int], position: int) -> tuple:
            nonlocal budget
            indices = list(own)
            while position >= 0:
                indices.extend(keyed_routes[keys[position]])
                position = parents[position]
            indices.sort()
            chosen = []
            for index in indices:
                chosen.append(cells[index])
                if cells[index][0] is None:  # this route always matches here: nothing after it can
                    break
            budget -= len(chosen)
            if budget < 0:
                raise IndexTooLarge
            return tuple(chosen)

        # One table per key; the last (index -1) is for a path under no key: no route.
        self._tables = (*(table([], position) for position in range(len(keys))), ())
        self._exact = {path: table(own, self._longest_key(path)) for path, own in exact_routes.items()}

    def _longest_key(self, path: bytes) -> int:
        keys = self._keys
        position = bisect_right(keys, path) - 1
        while position >= 0 and not path.startswith(keys[position]):
            position = self._parents[position]
        return position

    def match(self, method: str, host: bytes, path: bytes, headers: list) -> T | None:
        candidates = self._exact.get(path)
        if candidates is None:  # _longest_key, inline: a call less per request
            keys = self._keys
            position = bisect_right(keys, path) - 1
            while position >= 0 and not path.startswith(keys[position]):
                position = self._parents[position]
            candidates = self._tables[position]
        for matcher, target in candidates:
            if matcher is None or matcher(method, host, path, headers):
                return target
        return None


def build_router(entries: Sequence[tuple[Matcher, T]]) -> Router[T] | IndexedRouter[T]:
    """The scan for a few routes, the index from INDEX_FROM_ROUTES on (the scan if it would be too large)."""
    if len(entries) < INDEX_FROM_ROUTES:
        return Router(entries)
    try:
        return IndexedRouter(entries)
    except IndexTooLarge:
        return Router(entries)
